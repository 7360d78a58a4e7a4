"""One AVSR run: build the model, (decode it untrained), train projectors + LoRA, decode and score, save."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from recipes.common.checkpoints import load_checkpoint, resolve_resume, save_checkpoint

from .config import ModelConfig, RunConfig, TrainConfig
from .data.loader import make_loader
from .data.lrs3 import Utterance, normalize_text
from .lip_encoder import load_video_encoder
from .model import AVSRModel, load_audio_encoder, prepare_tokenizer

Log = Callable[[str], None]


def make_accelerator(grad_accum: int = 1, mixed_precision: str | None = None) -> Accelerator:
    """The process's one ``Accelerator``; its checkpoints hold only the trainable weights (safetensors)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum, **({"mixed_precision": mixed_precision} if mixed_precision else {})
    )
    _register_trainable_checkpointing(accelerator)
    return accelerator


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Projector and adapter weights only: what a checkpoint needs (the frozen encoders and LLM are on disk)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _register_trainable_checkpointing(accelerator: Accelerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the trainable weights (safetensors)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            save_file(
                trainable_state_dict(accelerator.unwrap_model(model)),
                os.path.join(output_dir, f"trainable_{i}.safetensors"),
            )
        weights.clear()  # accelerate then writes no full model file

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            expected = set(trainable_state_dict(model))
            if set(state) != expected:
                raise RuntimeError(
                    f"checkpoint {input_dir} does not match the model: differing keys "
                    f"{sorted(set(state) ^ expected)[:5]}"
                )
            model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------------


def peft_config(config: ModelConfig):
    """LoRA on the LLM, wrapped by sink decorrelation when ``config.decor_weight > 0``."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    if config.decor_weight <= 0:
        return lora
    from peft_gnnmoe.tuners.sink_decorrelation import SinkDecorrelationConfig

    layers = config.decor_layers if isinstance(config.decor_layers, str) else list(config.decor_layers)
    # BOS is the first valid position of every right-padded sequence; 'prefix' = tokens with label -100
    return SinkDecorrelationConfig(
        base_config=lora,
        weight=config.decor_weight,
        layers=layers,
        tokens=config.decor_tokens,
        form=config.decor_form,
        bos="first",
        task_type="CAUSAL_LM",
    )


def build_model(config: ModelConfig, modality: str) -> tuple[AVSRModel, object]:
    """Load encoders and LLM, add the delimiters, wrap the LLM with PEFT, and assemble the AVSR model.

    Returns the model and the audio feature extractor (None without audio).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.llm)
    added = prepare_tokenizer(tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(config.llm, dtype=torch.float32)
    if added:
        llm.resize_token_embeddings(len(tokenizer))
    llm.config.pad_token_id = tokenizer.pad_token_id
    llm = get_peft_model(llm, peft_config(config))
    audio_encoder = extractor = video_encoder = None
    if modality in ("asr", "avsr"):
        audio_encoder, extractor = load_audio_encoder(config.audio_encoder)
    if modality in ("vsr", "avsr"):
        video_encoder = load_video_encoder(config.video_encoder)
    model = AVSRModel(
        llm,
        tokenizer,
        modality,
        audio_encoder,
        video_encoder,
        config.audio_rate,
        config.video_rate,
        config.projector,
        config.projector_hidden,
        config.projector_layer_norm,
    )
    model.enable_feature_cache(config.cache_features)
    return model, extractor


# ---------------------------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig, accelerator: Accelerator, model, loader, run_dir: Path, modality: str, log: Log
) -> dict:
    """AdamW (β 0.9/0.98) + cosine schedule over the trainable weights, with checkpoints every ``save_every`` steps.

    Checkpoints go to ``run_dir/checkpoints/step_<N>`` (:mod:`recipes.common.checkpoints`: atomic, the newest
    ``checkpoints_total_limit`` kept); ``resume`` is such a folder or ``"latest"``.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    sampler = loader.batch_sampler
    lr = config.learning_rate(modality)
    steps_per_epoch = math.ceil(len(sampler) / accelerator.gradient_accumulation_steps)  # also steps at epoch end
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step, micro, history = 0, 0, []  # optimizer steps, micro-batches consumed, loss log
    resume = resolve_resume(run_dir, config.resume)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        step, micro, history = state["step"], state["micro"], state["history"]
        log(f"resumed from {resume} at step {step}")

    n_params = sum(p.numel() for p in params)
    log(f"[{modality}] training {n_params:,} parameters for {total} steps (lr {lr}, warmup {warmup})")
    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=step, desc=f"train {modality}", disable=not accelerator.is_local_main_process)
    while step < total:
        epoch, skip = divmod(micro, len(sampler))
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(epoch)  # accelerate's loader passes it on to the bucket sampler (data order)
        for batch in epoch_loader:
            micro += 1
            if not batch["uids"]:  # every file of the batch was unreadable
                continue
            with accelerator.accumulate(model):
                out = model(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            record = {"step": step, "loss": round(out.loss.item(), 4)}
            if getattr(out, "decorrelation_loss", None) is not None:
                record.update(ce=round(out.ce_loss.item(), 4), decor=round(out.decorrelation_loss.item(), 4))
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=record["loss"])
            if config.save_every and step % config.save_every == 0:
                state = {"step": step, "micro": micro, "history": history}
                save_checkpoint(accelerator, run_dir, step, state, config.checkpoints_total_limit)
            if step >= total:
                break
    bar.close()
    return {
        "steps": step,
        "lr": lr,
        "train_seconds": round(time.time() - start, 1),
        "trainable_params": n_params,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Decode and score
# ---------------------------------------------------------------------------------------------------------------------


def decode(
    accelerator: Accelerator, model, loader, desc: str, num_beams: int = 15, max_new_tokens: int = 32
) -> list[dict]:
    """Beam-search every test utterance; returns ``{"uid", "ref", "hyp"}`` rows."""
    from tqdm.auto import tqdm

    model = accelerator.unwrap_model(model)
    model.eval()
    rows = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        if not batch["uids"]:
            continue
        with accelerator.autocast():
            hyps = model.generate(batch, num_beams=num_beams, max_new_tokens=max_new_tokens)
        rows += [
            {"uid": u, "ref": r, "hyp": normalize_text(h)} for u, r, h in zip(batch["uids"], batch["texts"], hyps)
        ]
    return rows


def score(rows: list[dict]) -> dict:
    """WER and CER (jiwer) on lower-cased, punctuation-free words."""
    import jiwer

    if not rows:
        raise RuntimeError("no test utterance could be decoded (all files unreadable?)")
    refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
    return {"wer": round(100 * jiwer.wer(refs, hyps), 2), "cer": round(100 * jiwer.cer(refs, hyps), 2), "n": len(rows)}


# ---------------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------------


def run(
    config: RunConfig,
    accelerator: Accelerator,
    splits: dict[str, list[Utterance]],
    modality: str,
    run_dir: Path,
    log: Log,
    model_config: ModelConfig | None = None,
) -> tuple[dict, AVSRModel, object]:
    """Train and evaluate one configuration (``model_config``, default ``config.model``).

    Writes ``run_dir/results.{json,md}``, ``decodes.jsonl``, ``train_log.json`` and ``final/`` (adapter and
    projectors), and returns ``(results, model, feature_extractor)``: the trained model and its audio feature
    extractor (None without audio) feed the sink analysis.
    """
    from safetensors.torch import save_file
    from transformers import set_seed

    model_config = model_config or config.model
    set_seed(config.seed)
    model, extractor = build_model(model_config, modality)
    tokenizer = model.tokenizer
    train_loader = make_loader(config.loader, splits["train"], modality, extractor, tokenizer, True, config.seed)
    test_loader = make_loader(config.loader, splits["test"], modality, extractor, tokenizer, False)
    run_dir.mkdir(parents=True, exist_ok=True)

    results: dict = {
        "modality": modality,
        "audio_rate": model_config.audio_rate if modality != "vsr" else None,
        "video_rate": model_config.video_rate if modality != "asr" else None,
        "projector": model_config.projector,
        "decor_weight": model_config.decor_weight,
        "llm": model_config.llm,
    }
    beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    if config.eval_untrained and not config.train.resume:
        rows = decode(accelerator, model, test_loader, f"decode untrained {modality}", **beams)
        results["untrained"] = score(rows)
        log(f"[{modality}] untrained WER {results['untrained']['wer']:.1f}%")
    results["training"] = train(config.train, accelerator, model, train_loader, run_dir, modality, log)
    rows = decode(accelerator, model, test_loader, f"decode {modality}", **beams)
    results["test"] = score(rows)
    skipped = {**train_loader.dataset.bad, **test_loader.dataset.bad}
    results["skipped_files"] = {"count": len(skipped), "examples": dict(list(skipped.items())[:10])}
    log(
        f"[{modality}] test WER {results['test']['wer']:.2f}%  CER {results['test']['cer']:.2f}%  "
        f"({results['test']['n']} utterances, {len(skipped)} skipped)"
    )

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        final = run_dir / "final"
        unwrapped.llm.save_pretrained(final / "adapter")
        save_file(unwrapped.projector_state_dict(), final / "projectors.safetensors")
        with open(run_dir / "decodes.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        history = results["training"].pop("history")
        (run_dir / "train_log.json").write_text(json.dumps(history))
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        (run_dir / "results.md").write_text(results_table([results]))
    accelerator.free_memory()  # the next run prepares its own model, optimizer and loaders on the same accelerator
    return results, accelerator.unwrap_model(model), extractor


def results_table(results: list[dict]) -> str:
    """A markdown table of runs' results."""
    lines = [
        "| modality | audio rate | video rate | decor λ | WER % | CER % | untrained WER % | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["training"]
        lines.append(
            f"| {r['modality']} | {r['audio_rate'] or '–'} | {r['video_rate'] or '–'} | {r['decor_weight']} | "
            f"{r['test']['wer']:.2f} | {r['test']['cer']:.2f} | "
            f"{r.get('untrained', {}).get('wer', float('nan')):.2f} | {t['steps']} | {t['train_seconds']} |"
        )
    return "\n".join(lines) + "\n"
