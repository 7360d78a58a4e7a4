"""One AVSR run: build the model, (decode it untrained), train projectors + LoRA, decode and score, save."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from recipes.common.checkpoints import load_checkpoint, resolve_resume, save_checkpoint

from .averaging import load_average_of_last
from .build import build_model, peft_config  # noqa: F401  (peft_config: part of this module's API)
from .config import ModelConfig, RunConfig, TrainConfig
from .controls import chance_baseline
from .data.loader import make_loader
from .data.lrs3 import Utterance
from .evaluation import decode, score, swap_controls, validation_loss
from .model import AVSRModel
from .weights import load_final, read_run, register_trainable_checkpointing, save_final

Log = Callable[[str], None]


def make_accelerator(grad_accum: int = 1, mixed_precision: str | None = None) -> Accelerator:
    """The process's one ``Accelerator``; its checkpoints hold only the trainable weights (safetensors)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum, **({"mixed_precision": mixed_precision} if mixed_precision else {})
    )
    register_trainable_checkpointing(accelerator)
    return accelerator


# ---------------------------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------------------------


def set_epoch(loader, epoch: int) -> int:
    """Put ``loader`` (prepared or not) at ``epoch`` and return this process's number of batches in it.

    The bucket sampler's batches (and their number) depend on the epoch; accelerate forwards ``set_epoch`` to it
    only in a single process (with several, its ``BatchSamplerShard`` sits in between), so it is set here directly.
    A prepared loader then gives this process's share.
    """
    if hasattr(loader, "set_epoch"):  # accelerate's loaders (also their RNG synchronisation)
        loader.set_epoch(epoch)
    inner = loader.batch_sampler
    while inner is not None and not hasattr(inner, "set_epoch"):
        inner = getattr(inner, "batch_sampler", None)
    if inner is not None:
        inner.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # the augmentation's draws (worker processes copy it at each epoch)
        loader.dataset.set_epoch(epoch)
    return len(loader)


def total_steps(loader, epochs: float, grad_accum: int) -> int:
    """Optimizer steps of ``epochs`` epochs (a fraction for the last), counted epoch by epoch on this process's
    share of the batches; an epoch's last, partial accumulation also steps."""
    total, epoch = 0, 0
    while epoch < epochs:
        steps = math.ceil(set_epoch(loader, epoch) / grad_accum)
        total += steps if epoch + 1 <= epochs else math.ceil((epochs - epoch) * steps)
        epoch += 1
    return total


def train(
    config: TrainConfig,
    accelerator: Accelerator,
    model,
    loader,
    run_dir: Path,
    modality: str,
    log: Log,
    skipped: dict[str, str] | None = None,
    val_loader=None,
) -> dict:
    """AdamW (β 0.9/0.98) + cosine schedule over the trainable weights, with checkpoints every ``save_every`` steps.

    Checkpoints go to ``run_dir/checkpoints/step_<N>`` (:mod:`recipes.common.checkpoints`: atomic, the newest
    ``checkpoints_total_limit`` kept) with the epoch and the batches of it already consumed; ``resume`` is such a
    folder or ``"latest"``. Files skipped as unreadable are added to ``skipped`` (uid -> reason). With a
    ``val_loader``, the loss on it is logged after every epoch (``{"step", "epoch", "val_loss"}`` rows of the
    history).
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    skipped = {} if skipped is None else skipped
    lr = config.learning_rate(modality)
    loader = accelerator.prepare(loader)  # first: the step count depends on this process's share of the batches
    total = config.max_steps or total_steps(loader, config.epochs, accelerator.gradient_accumulation_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step: scale it to match
    n = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * n, total * n)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, done, history = 0, 0, 0, []  # optimizer steps, epoch, its batches consumed, loss log
    resume = resolve_resume(run_dir, config.resume)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        step, epoch, done, history = state["step"], state["epoch"], state["batches"], state["history"]
        log(f"resumed from {resume} at step {step} (epoch {epoch}, batch {done})")

    n_params = sum(p.numel() for p in params)
    log(f"[{modality}] training {n_params:,} parameters for {total} steps (lr {lr}, warmup {warmup})")
    model.train()
    start = time.time()
    bar = tqdm(total=total, initial=step, desc=f"train {modality}", disable=not accelerator.is_local_main_process)
    while step < total:
        set_epoch(loader, epoch)
        epoch_loader = accelerator.skip_first_batches(loader, done) if done else loader
        fresh, usable = done == 0, 0
        for batch in epoch_loader:
            done += 1
            skipped.update(batch.get("skipped", {}))
            if not batch["uids"]:  # every file of the batch was unreadable
                continue
            usable += 1
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
            parts = {"ce": out.ce_loss, "decor": out.decorrelation_loss, "ctc": out.ctc_loss}
            record.update({name: round(v.item(), 4) for name, v in parts.items() if v is not None})
            history.append(record)
            bar.update(1)
            bar.set_postfix({k: v for k, v in record.items() if k != "step"})  # the loss and its parts
            if config.save_every and step % config.save_every == 0:
                state = {"step": step, "epoch": epoch, "batches": done, "history": history}
                save_checkpoint(accelerator, run_dir, step, state, config.checkpoints_total_limit)
            if step >= total:
                break
        if fresh and not usable:  # the next epoch would be the same: stop instead of spinning at this step
            raise RuntimeError(
                f"{modality} training: no file of epoch {epoch} could be read ({len(skipped)} skipped, e.g. "
                f"{list(skipped.values())[:3]}); check the data (--data_dir, the labels CSV, the file formats)"
            )
        if val_loader is not None:
            history.append({"step": step, "epoch": epoch, "val_loss": validation_loss(accelerator, model, val_loader)})
            log(f"[{modality}] epoch {epoch}: validation loss {history[-1]['val_loss']}")
        epoch, done = epoch + 1, 0
    bar.close()
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": step,
        "lr": lr,
        "train_seconds": round(time.time() - start, 1),
        "trainable_params": n_params,
        "final_loss": losses[-1] if losses else None,
        "history": history,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Decode and score
# ---------------------------------------------------------------------------------------------------------------------


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

    Writes ``run_dir/results.{json,md}``, ``decodes.jsonl``, ``train_log.json`` and ``final/`` (see
    :mod:`recipes.avsr.weights`), and returns ``(results, model, feature_extractor)``: the trained model and its
    audio feature extractor (None without audio) feed the sink analysis.
    """
    from transformers import set_seed

    model_config = model_config or config.model
    set_seed(config.seed)
    model, extractor = build_model(model_config, modality)
    tokenizer = model.tokenizer
    train_utts, val_utts = split_validation(splits["train"], config.train.val_utts)
    train_loader = make_loader(
        config.loader, train_utts, modality, extractor, tokenizer, True, config.seed, babble_from=train_utts
    )
    test_loader = make_loader(
        config.loader, splits["test"], modality, extractor, tokenizer, False, babble_from=train_utts
    )
    val_loader = None
    if val_utts:  # clean, like the training split it comes from (the test noise is for the test set)
        clean = dataclasses.replace(config.loader, test_snr_db=None)
        val_loader = make_loader(clean, val_utts, modality, extractor, tokenizer, False)
    run_dir.mkdir(parents=True, exist_ok=True)

    results = {**_describe(model_config, modality), "seed": config.seed}
    beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    skipped = {**train_loader.dataset.bad, **test_loader.dataset.bad}
    if config.eval_untrained:  # also when resuming: the model is still untrained here
        rows = decode(accelerator, model, test_loader, f"decode untrained {modality}", skipped=skipped, **beams)
        results["untrained"] = score(rows)
        log(f"[{modality}] untrained WER {results['untrained']['wer']:.1f}%")
    results["training"] = train(
        config.train, accelerator, model, train_loader, run_dir, modality, log, skipped, val_loader
    )
    if config.train.average_last:
        used = load_average_of_last(accelerator.unwrap_model(model), run_dir, config.train.average_last)
        results["training"]["averaged"] = [p.name for p in used]
        log(f"[{modality}] final weights: the average of {', '.join(p.name for p in used)}")
    rows = decode(accelerator, model, test_loader, f"decode {modality}", skipped=skipped, **beams)
    _finish(results, rows, skipped, accelerator, run_dir, modality, log)
    _ctc_test(results, accelerator, model, test_loader, log)
    _controls(results, config, accelerator, model, test_loader, train_utts, rows, skipped, log)
    _noisy_tests(results, config, accelerator, model, extractor, splits["test"], train_utts, run_dir, log)
    _real_speech(results, config, accelerator, model, extractor, splits, run_dir, log)
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(model), run_dir / "final", model_config, modality)
        history = results["training"].pop("history")
        (run_dir / "train_log.json").write_text(json.dumps(history))
        _write_results(results, rows, run_dir)
    accelerator.free_memory()  # the next run prepares its own model, optimizer and loaders on the same accelerator
    return results, accelerator.unwrap_model(model), extractor


def evaluate_final(
    config: RunConfig, accelerator: Accelerator, splits: dict[str, list[Utterance]], run_dir: Path, log: Log
) -> dict:
    """``--eval_only``: rebuild the model of ``config.resume_from`` (a finished run's ``final/``), decode the test
    split and write ``run_dir/results.{json,md}`` and ``decodes.jsonl``."""
    from transformers import set_seed

    modality, model_config = read_run(config.resume_from)
    set_seed(config.seed)
    model, extractor = build_model(model_config, modality)
    load_final(model, config.resume_from)
    model.to(accelerator.device)
    test_loader = make_loader(
        config.loader, splits["test"], modality, extractor, model.tokenizer, False, babble_from=splits["train"]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {**_describe(model_config, modality), "resumed_from": str(config.resume_from)}
    skipped = dict(test_loader.dataset.bad)
    beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    rows = decode(accelerator, model, test_loader, f"decode {modality}", skipped=skipped, **beams)
    _finish(results, rows, skipped, accelerator, run_dir, modality, log)
    _ctc_test(results, accelerator, model, test_loader, log)
    _controls(results, config, accelerator, model, test_loader, splits["train"], rows, skipped, log)
    _noisy_tests(results, config, accelerator, model, extractor, splits["test"], splits["train"], run_dir, log)
    _real_speech(results, config, accelerator, model, extractor, splits, run_dir, log)
    if accelerator.is_main_process:
        _write_results(results, rows, run_dir)
    return results


def split_validation(train: list[Utterance], n: int) -> tuple[list[Utterance], list[Utterance]]:
    """The training utterances without the last ``n``, and those ``n`` (held out for the validation loss)."""
    if n >= len(train):
        raise ValueError(f"--val_utts {n} would leave no training utterance (the split has {len(train)})")
    return (train[:-n], train[-n:]) if n else (train, [])


def _ctc_test(results, accelerator, model, test_loader, log) -> None:
    """With the CTC alignment loss: ``results["ctc_test"]``, the WER of what the projector spells on its own."""
    if accelerator.unwrap_model(model).ctc_head is None:
        return
    desc = f"decode {results['modality']} (CTC)"
    results["ctc_test"] = score(decode(accelerator, model, test_loader, desc, read=AVSRModel.ctc_transcripts))
    log(f"[{results['modality']}] test WER of the projector's own CTC reading: {results['ctc_test']['wer']:.2f}%")


def _controls(results, config: RunConfig, accelerator, model, test_loader, train_utts, rows, skipped, log) -> None:
    """The chance level of the test set and, with ``--swap_controls``, the WERs with swapped streams."""
    modality = results["modality"]
    results["chance"] = chance_baseline([u.text for u in train_utts], [r["ref"] for r in rows])
    log(f"[{modality}] chance WER {results['chance']['wer']:.2f}% (a constant transcript from the training split)")
    if config.swap_controls:
        beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
        swaps = swap_controls(accelerator, model, test_loader, modality, config.swap_seed, skipped, **beams)
        results.update(swaps)
        log(f"[{modality}] swap controls: " + ", ".join(f"{k} {v:.2f}%" for k, v in swaps.items()))


def _noisy_tests(results, config: RunConfig, accelerator, model, extractor, test, babble_from, run_dir, log) -> None:
    """``--test_snrs``: the test set decoded again with ``config.loader.test_noise`` at each SNR (the noise of an
    utterance is fixed by its uid, so every model hears the same); ``results["test_by_snr"]`` and
    ``decodes_snr_<S>.jsonl``. Video-only runs have no audio to add noise to: skipped."""
    modality = results["modality"]
    if not config.test_snrs or modality == "vsr":
        return
    beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    by_snr = {}
    for snr in config.test_snrs:
        noisy = dataclasses.replace(config.loader, test_snr_db=snr)
        loader = make_loader(noisy, test, modality, extractor, model.tokenizer, False, babble_from=babble_from)
        with accelerator.unwrap_model(model).feature_cache_paused():  # the cache holds these uids' clean features
            rows = decode(accelerator, model, loader, f"decode {modality} at {snr:g} dB", **beams)
        by_snr[f"{snr:g}"] = score(rows)
        log(f"[{modality}] test WER at {snr:g} dB SNR ({config.loader.test_noise}): {by_snr[f'{snr:g}']['wer']:.2f}%")
        if accelerator.is_main_process:
            with open(run_dir / f"decodes_snr_{snr:g}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    results["test_by_snr"] = {"noise": config.loader.test_noise, "snr_db": by_snr}


def _real_speech(results, config: RunConfig, accelerator, model, extractor, splits, run_dir: Path, log) -> None:
    """``--real_speech_test`` (asr runs): decode the recorded utterances too; ``results["real_speech"]`` and
    ``decodes_real_speech.jsonl``. Ten utterances of two speakers, outside the embedded grammar's vocabulary."""
    if "real_speech" not in splits or results["modality"] != "asr":
        return
    clean = dataclasses.replace(config.loader, test_snr_db=None)  # the recordings as recorded
    loader = make_loader(clean, splits["real_speech"], "asr", extractor, model.tokenizer, False)
    beams = {"num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}
    rows = decode(accelerator, model, loader, "decode recorded speech", **beams)
    results["real_speech"] = score(rows)
    log(f"[asr] recorded-speech WER {results['real_speech']['wer']:.2f}% ({results['real_speech']['n']} utterances)")
    if accelerator.is_main_process:
        with open(run_dir / "decodes_real_speech.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _describe(model_config: ModelConfig, modality: str) -> dict:
    return {
        "modality": modality,
        "audio_rate": model_config.audio_rate if modality != "vsr" else None,
        "video_rate": model_config.video_rate if modality != "asr" else None,
        "projector": model_config.projector,
        "decor_weight": model_config.decor_weight,
        "llm": model_config.llm,
        **({"ctc_weight": model_config.ctc_weight} if model_config.ctc_weight else {}),  # absent: no CTC loss
    }


def _finish(results: dict, rows: list[dict], skipped: dict, accelerator: Accelerator, run_dir, modality, log) -> None:
    """Score the decodes and count the skipped files of every process."""
    from accelerate.utils import gather_object

    results["test"] = score(rows)
    if accelerator.num_processes > 1:
        skipped = {k: v for part in gather_object([skipped]) for k, v in part.items()}
    results["skipped_files"] = {"count": len(skipped), "examples": dict(list(skipped.items())[:10])}
    log(
        f"[{modality}] test WER {results['test']['wer']:.2f}%  CER {results['test']['cer']:.2f}%  "
        f"({results['test']['n']} utterances, {len(skipped)} skipped)"
    )


def _write_results(results: dict, rows: list[dict], run_dir: Path) -> None:
    with open(run_dir / "decodes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "results.md").write_text(results_table([results]))


def results_table(results: list[dict]) -> str:
    """A markdown table of runs' results."""
    lines = [
        "| modality | audio rate | video rate | decor λ | WER % | CER % | chance WER % | WER swapped video % "
        "| WER swapped audio % | recorded speech WER % | untrained WER % | WER % by SNR (dB) | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.get("training", {"steps": "–", "train_seconds": "–"})  # --eval_only: no training
        lines.append(
            f"| {r['modality']} | {r['audio_rate'] or '–'} | {r['video_rate'] or '–'} | {r['decor_weight']} | "
            f"{r['test']['wer']:.2f} | {r['test']['cer']:.2f} | {_cell(r.get('chance', {}).get('wer'))} | "
            f"{_cell(r.get('wer_swap_video'))} | {_cell(r.get('wer_swap_audio'))} | "
            f"{_cell(r.get('real_speech', {}).get('wer'))} | {r.get('untrained', {}).get('wer', float('nan')):.2f} | "
            f"{_snr_cell(r)} | {t['steps']} | {t['train_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def _snr_cell(result: dict) -> str:
    by_snr = result.get("test_by_snr", {}).get("snr_db", {})
    return ", ".join(f"{snr}: {v['wer']:.2f}" for snr, v in by_snr.items()) or "–"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
