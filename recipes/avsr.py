"""LLM-based ASR / VSR / AVSR with LoRA and optional sink decorrelation, in the Llama-AVSR style.

    accelerate launch recipes/avsr.py                       # embedded default: offline corpus, asr + vsr + avsr
    accelerate launch recipes/avsr.py --experiment sinks    # the sink paper's experiment in miniature
    accelerate launch recipes/avsr.py --modality avsr --data_dir /data/lrs3 --llm meta-llama/Llama-3.2-1B \\
        --audio_encoder openai/whisper-medium --video_encoder path/to/lip_encoder --audio_rate 4 --video_rate 2 \\
        --decor_weight 0.1 --output_dir runs/avsr

Without ``--data_dir`` the recipe synthesises a small GRID-like corpus (espeak-ng speech + phoneme-timed mouth
video, written in the auto_avsr LRS3 layout), builds small stand-ins for the pretrained checkpoints (Whisper and lip
encoders trained with word-level CTC, a Llama trained as a language model, all on the training split only), then
trains projectors + LoRA and decodes every modality. Each run writes ``results.json`` / ``results.md``, the decoded
transcripts, and the adapter + projector weights (safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/ is not a package: import the siblings

import avsr_data as D  # noqa: E402
import avsr_model as M  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("task")
    g.add_argument(
        "--modality",
        nargs="+",
        choices=["asr", "vsr", "avsr"],
        default=["asr", "vsr", "avsr"],
        help="one or more modalities, each trained and decoded in turn",
    )
    g.add_argument(
        "--experiment",
        choices=["none", "sinks"],
        default="none",
        help="'sinks': train with/without the decorrelation loss at a low and a high rate, then analyse",
    )
    g.add_argument("--output_dir", default="runs/avsr")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir", default=None, help="LRS3 root (auto_avsr or raw layout); default: the embedded corpus"
    )
    g.add_argument("--layout", choices=["auto", "auto_avsr", "raw"], default="auto")
    g.add_argument(
        "--train_csv", default=None, help="auto_avsr labels CSV for training (default: the one named *train*)"
    )
    g.add_argument("--test_csv", default=None, help="auto_avsr labels CSV for testing (default: the one named *test*)")
    g.add_argument("--raw_train_subsets", nargs="+", default=["trainval"], help="raw LRS3 folders used for training")
    g.add_argument(
        "--crop_size",
        type=int,
        default=None,
        help="centre crop of the mouth frames (default 88 for LRS3, 44 for the embedded corpus)",
    )
    g.add_argument(
        "--mouth_box",
        type=int,
        nargs=4,
        default=None,
        metavar=("TOP", "LEFT", "H", "W"),
        help="fixed mouth region cut from raw LRS3 face videos before cropping",
    )
    g.add_argument("--max_frames", type=int, default=None, help="frame budget of a batch (video frames at 25 fps)")
    g.add_argument("--max_batch_size", type=int, default=16)
    g.add_argument("--max_test_utts", type=int, default=None, help="decode only the first N test utterances")
    g.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode every file once into memory (default: on for the embedded corpus)",
    )
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument(
        "--random_crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop of the training frames (default: on for LRS3, off for the embedded corpus)",
    )
    g.add_argument(
        "--cache_features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep each utterance's frozen-encoder output in memory (default: on for the embedded corpus)",
    )
    g.add_argument("--corpus_train", type=int, default=1200, help="embedded corpus: training utterances")
    g.add_argument("--corpus_test", type=int, default=120, help="embedded corpus: test utterances")

    g = p.add_argument_group("model")
    g.add_argument("--llm", default=None, help="causal LM id or path (default: an embedded small Llama)")
    g.add_argument("--audio_encoder", default=None, help="Whisper id or path (default: an embedded small Whisper)")
    g.add_argument(
        "--video_encoder",
        default=None,
        help="saved LipEncoderModel dir or transformers image model (default: an embedded LipEncoder)",
    )
    g.add_argument("--audio_rate", type=int, default=4, help="audio frames (50 Hz) per LLM token")
    g.add_argument("--video_rate", type=int, default=2, help="video frames (25 fps) per LLM token")
    g.add_argument(
        "--projector",
        choices=["stack", "avg"],
        default=None,
        help="compress by stacking K frames or average-pooling them (default: stack; avg for --experiment sinks, as "
        "in the sink paper)",
    )
    g.add_argument(
        "--projector_hidden", type=int, default=None, help="projector MLP width (default 2048; 512 embedded)"
    )
    g.add_argument("--projector_layer_norm", action="store_true")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", nargs="+", default=["q_proj", "v_proj"])

    g = p.add_argument_group("sink decorrelation")
    g.add_argument("--decor_weight", type=float, default=0.0, help="lambda of the decorrelation loss (0 = off)")
    g.add_argument("--decor_tokens", choices=["all", "prefix"], default="prefix")
    g.add_argument("--decor_layers", default="all_but_last", help="'all', 'all_but_last' or comma-separated indices")
    g.add_argument("--decor_form", choices=["squared", "abs"], default="squared")
    g.add_argument(
        "--sink_rates",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="--experiment sinks: low and high rate of the analysed modality (default 2 16 audio, 1 8 video)",
    )
    g.add_argument("--sink_threshold", type=float, default=0.3, help="attention-sink score threshold (Gu et al.)")
    g.add_argument("--massive_magnitude", type=float, default=100.0, help="massive activation: |h| above this")
    g.add_argument("--massive_ratio", type=float, default=1000.0, help="massive activation: |h| / median above this")

    g = p.add_argument_group("training and decoding")
    g.add_argument("--epochs", type=float, default=None, help="training epochs (default 12 embedded, 10 otherwise)")
    g.add_argument("--max_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--lr", type=float, default=None, help="default 1e-3 (asr, avsr) / 5e-4 (vsr), as Llama-AVSR")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate's config"
    )
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--resume", default=None, help="checkpoint dir to resume from, or 'latest'")
    g.add_argument("--num_beams", type=int, default=15)
    g.add_argument("--max_new_tokens", type=int, default=32)
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument(
        "--eval_untrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode with the untrained model (the WER that training must beat)",
    )
    g.add_argument("--encoder_pretrain_steps", type=int, default=800, help="embedded encoders: CTC steps")
    g.add_argument("--text_pretrain_steps", type=int, default=300, help="embedded LLM: language-model steps")
    return p.parse_args(argv)


def embedded(args: argparse.Namespace) -> bool:
    """Whether the run uses the embedded corpus and models (no ``--data_dir`` given)."""
    return getattr(args, "embedded", args.data_dir is None)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_splits(args: argparse.Namespace, log) -> dict[str, list[D.Utterance]]:
    """Train and test utterances from ``args.data_dir`` (manifests written to the output dir)."""
    root = Path(args.data_dir)
    layout = D.detect_layout(root) if args.layout == "auto" else args.layout
    if layout == "auto_avsr":
        splits = {
            "train": D.scan_auto_avsr(root, args.train_csv or D.find_split_csv(root, "train")),
            "test": D.scan_auto_avsr(root, args.test_csv or D.find_split_csv(root, "test")),
        }
    else:
        splits = {"train": D.scan_raw_lrs3(root, args.raw_train_subsets), "test": D.scan_raw_lrs3(root, ["test"])}
        for utts in splits.values():
            D.probe_frame_counts(utts)
    if args.max_test_utts:
        splits["test"] = splits["test"][: args.max_test_utts]
    for name, utts in splits.items():
        D.write_manifest(utts, Path(args.output_dir) / f"manifest_{name}.jsonl")
        log(f"{name}: {len(utts)} utterances ({layout} layout, {root})")
    return splits


def make_loader(args, utts, modality, feature_extractor, train: bool, seed: int = 0):
    """A DataLoader over ``utts`` with length-bucketed batches; returns (loader, dataset, sampler, collator)."""
    from torch.utils.data import DataLoader

    utts, problems = D.check_files(utts, modality)
    for msg in problems:
        print(f"warning: skipping {msg}", file=sys.stderr)
    random_crop = train and (not embedded(args) if args.random_crop is None else args.random_crop)
    box = tuple(args.mouth_box) if args.mouth_box else None
    transform = D.VideoTransform(crop_size=args.crop_size, mouth_box=box, random_crop=random_crop)
    preload = embedded(args) if args.preload is None else args.preload
    dataset = D.AVSRDataset(utts, modality, transform, train=train, preload=preload)
    dataset.bad.update({m.split(":")[0]: m for m in problems})
    lengths = dataset.lengths
    max_frames = args.max_frames or max(lengths) * args.max_batch_size
    sampler = D.LengthBucketSampler(
        lengths,
        max(max_frames, max(lengths)),
        args.max_batch_size if train else args.eval_batch_size,
        shuffle=train,
        seed=seed,
    )
    collator = D.AVSRCollator(feature_extractor)
    # a private generator: starting an epoch must not draw from the global RNG (dropout), or a resumed run drifts
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.num_workers, generator=generator
    )
    return loader, dataset, sampler, collator


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def embedded_model_paths(args: argparse.Namespace) -> dict[str, Path]:
    base = Path(args.output_dir) / "base_models"
    return {name: base / name for name in ("llm", "audio_encoder", "video_encoder")}


def build_embedded_models(args: argparse.Namespace, train_utts: list[D.Utterance], log) -> None:
    """Save the embedded encoders and LLM under ``output_dir/base_models`` (kept when already there).

    They stand in for the pretrained checkpoints of a real run, and are pretrained here on the training split only
    (the test sentences are never seen): the small Whisper and lip encoders with word-level CTC (Whisper and
    AV-HuBERT carry linguistic features too), the small Llama as a language model on the transcripts. The AVSR runs
    then keep all three frozen and train only the projectors and LoRA, as Llama-AVSR does.
    """
    from transformers import set_seed

    paths = embedded_model_paths(args)
    if all((p / "config.json").is_file() for p in paths.values()):
        return
    set_seed(args.seed)
    texts = [u.text for u in train_utts]
    words = sorted({w for t in texts for w in t.split()} | {w for ws in D.GRAMMAR.values() for w in ws})
    tokenizer = M.build_word_tokenizer(words)
    audio_encoder, extractor = M.tiny_audio_encoder(seconds=3)
    video_encoder = M.tiny_video_encoder()
    log(
        f"pretraining the embedded encoders with CTC on {len(train_utts)} utterances "
        f"({args.encoder_pretrain_steps} steps)"
    )
    losses = pretrain_encoders_ctc(args, audio_encoder, video_encoder, extractor, tokenizer, train_utts)
    log(
        "embedded encoders: CTC loss " + ", ".join(f"{k} {v[0]:.2f} -> {_tail_mean(v):.2f}" for k, v in losses.items())
    )
    audio_encoder.save_pretrained(paths["audio_encoder"])
    extractor.save_pretrained(paths["audio_encoder"])
    video_encoder.save_pretrained(paths["video_encoder"])
    llm = M.tiny_llm(tokenizer)
    log(f"pretraining the embedded LLM on {len(texts)} transcripts ({args.text_pretrain_steps} steps)")
    losses = pretrain_text_llm(llm, tokenizer, texts, args.text_pretrain_steps, seed=args.seed)
    log(f"embedded LLM: text loss {losses[0]:.2f} -> {_tail_mean(losses):.2f}")
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])


def _tail_mean(values: list[float], n: int = 20) -> float:
    return sum(values[-n:]) / max(1, len(values[-n:]))


def pretrain_encoders_ctc(args, audio_encoder, video_encoder, extractor, tokenizer, utts) -> dict[str, list[float]]:
    """Word-level CTC training of both embedded encoders (a linear head each, discarded afterwards)."""
    from tqdm.auto import tqdm

    heads = torch.nn.ModuleDict(
        {
            "audio": torch.nn.Linear(audio_encoder.config.d_model, len(tokenizer)),
            "video": torch.nn.Linear(video_encoder.config.hidden_size, len(tokenizer)),
        }
    )
    encoders = torch.nn.ModuleDict({"audio": audio_encoder, "video": video_encoder})
    params = list(encoders.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    steps = args.encoder_pretrain_steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
    ctc = torch.nn.CTCLoss(blank=tokenizer.pad_token_id, zero_infinity=True)
    loader, *_ = make_loader(args, utts, "avsr", extractor, train=True, seed=args.seed)
    encoders.train()
    losses: dict[str, list[float]] = {"audio": [], "video": []}
    bar = tqdm(total=steps, desc="encoder pretraining (CTC)", leave=False)
    epoch = 0
    while bar.n < steps:
        loader.batch_sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            if bar.n >= steps:
                break
            if not batch["uids"]:
                continue
            targets = [tokenizer(t, add_special_tokens=False).input_ids for t in batch["texts"]]
            flat = torch.tensor([i for t in targets for i in t])
            target_lengths = torch.tensor([len(t) for t in targets])
            lengths = {"audio": batch["audio_lengths"], "video": batch["video_lengths"]}
            feats = {
                "audio": audio_encoder(batch["audio_features"]).last_hidden_state[:, : int(lengths["audio"].max())],
                "video": video_encoder(batch["video"], lengths["video"]).last_hidden_state,
            }
            total = 0.0
            for name, hidden in feats.items():
                log_probs = heads[name](hidden).log_softmax(-1).transpose(0, 1)  # T, B, V
                loss = ctc(log_probs, flat, lengths[name], target_lengths)
                losses[name].append(loss.item())
                total = total + loss
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.update(1)
    bar.close()
    encoders.eval()
    return losses


def pretraining_line(rng, texts: list[str]) -> str:
    """One line of the embedded LLM's text pretraining.

    Half the lines are plain language modelling (``[prompt] sentence``); the other half teach in-context copying,
    the skill a pretrained LLM brings to Llama-AVSR: the sentence spread out (every word repeated 1-3 times, with
    runs of "." between words, like words spread over frames with pauses), then a prompt, then the sentence. No
    modality delimiter is ever seen.
    """
    sentence = rng.choice(texts)
    prompt = rng.choice(list(M.PROMPTS.values()))
    if rng.random() < 0.5:
        return f"{prompt} {sentence}" if rng.random() < 0.5 else sentence
    spread = [" ".join(["."] * rng.randint(0, 3) + [w] * rng.randint(1, 3)) for w in sentence.split()]
    return f"{' '.join(spread)} {prompt} {sentence}"


def pretrain_text_llm(
    llm, tokenizer, texts: list[str], steps: int, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """Causal-LM training of the embedded LLM on :func:`pretraining_line` text; returns the losses."""
    import random

    from tqdm.auto import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    llm.train()
    losses = []
    for _ in tqdm(range(steps), desc="text pretraining", leave=False):
        lines = [pretraining_line(rng, texts) for _ in range(batch_size)]
        enc = tokenizer(
            [f"{tokenizer.bos_token} {t} {tokenizer.eos_token}" for t in lines],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = llm(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    llm.eval()
    return losses


def peft_config(args: argparse.Namespace, decor_weight: float):
    """LoRA on the LLM, wrapped by sink decorrelation when ``decor_weight > 0``."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_targets),
        task_type="CAUSAL_LM",
    )
    if decor_weight <= 0:
        return lora
    from peft_gnnmoe.tuners.sink_decorrelation import SinkDecorrelationConfig

    layers = (
        args.decor_layers
        if args.decor_layers in ("all", "all_but_last")
        else [int(i) for i in args.decor_layers.split(",")]
    )
    # BOS is the first valid position of every right-padded sequence; 'prefix' = tokens with label -100
    return SinkDecorrelationConfig(
        base_config=lora,
        weight=decor_weight,
        layers=layers,
        tokens=args.decor_tokens,
        form=args.decor_form,
        bos="first",
        task_type="CAUSAL_LM",
    )


def build_model(args: argparse.Namespace, modality: str, audio_rate: int, video_rate: int, decor_weight: float):
    """Load encoders and LLM, add the delimiters, wrap the LLM with PEFT, and assemble the AVSR model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    added = M.prepare_tokenizer(tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(args.llm, dtype=torch.float32)
    if added:
        llm.resize_token_embeddings(len(tokenizer))
    llm.config.pad_token_id = tokenizer.pad_token_id
    llm = get_peft_model(llm, peft_config(args, decor_weight))
    audio_encoder = extractor = video_encoder = None
    if modality in ("asr", "avsr"):
        audio_encoder, extractor = M.load_audio_encoder(args.audio_encoder)
    if modality in ("vsr", "avsr"):
        video_encoder = M.load_video_encoder(args.video_encoder)
    hidden = args.projector_hidden or (512 if embedded(args) else 2048)
    cache = embedded(args) if args.cache_features is None else args.cache_features
    if cache and (args.random_crop or (args.random_crop is None and not embedded(args))):
        raise ValueError("--cache_features reuses encoder outputs, which --random_crop would change; pick one")
    model = M.AVSRModel(
        llm,
        tokenizer,
        modality,
        audio_encoder,
        video_encoder,
        audio_rate,
        video_rate,
        args.projector,
        hidden,
        args.projector_layer_norm,
    )
    model.enable_feature_cache(cache)
    return model, extractor


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Projector and adapter weights only: what a checkpoint needs (the frozen encoders and LLM are on disk)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _register_trainable_checkpointing(accelerator) -> None:
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


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    steps = sorted(
        (int(p.name.split("_")[-1]), p) for p in ckpt_root.glob("step_*") if (p / "trainer_state.json").is_file()
    )
    return steps[-1][1] if steps else None


def train(args, accelerator, model, loader, sampler, run_dir: Path, modality: str, log) -> dict:
    """AdamW (β 0.9/0.98) + cosine schedule over the trainable weights, with checkpoints every ``save_every`` steps."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    lr = args.lr or (5e-4 if modality == "vsr" else 1e-3)
    epochs = args.epochs or (12 if embedded(args) else 10)
    steps_per_epoch = math.ceil(len(sampler) / args.grad_accum)  # accelerate also steps at the end of an epoch
    total = args.max_steps or math.ceil(epochs * steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 20)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    _register_trainable_checkpointing(accelerator)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ckpt_root = run_dir / "checkpoints"
    step, micro, history = 0, 0, []  # optimizer steps, micro-batches consumed, loss log
    resume = _latest_checkpoint(ckpt_root) if args.resume == "latest" else (Path(args.resume) if args.resume else None)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "trainer_state.json").read_text())
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
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(
                    accelerator, ckpt_root / f"step_{step}", {"step": step, "micro": micro, "history": history}
                )
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


def save_checkpoint(accelerator, path: Path, state: dict) -> None:
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps(state))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and scoring
# ---------------------------------------------------------------------------------------------------------------------


def decode(args, accelerator, model, loader, desc: str) -> list[dict]:
    """Beam-search every test utterance; returns ``{"uid", "ref", "hyp"}`` rows."""
    from tqdm.auto import tqdm

    model = accelerator.unwrap_model(model)
    model.eval()
    rows = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        if not batch["uids"]:
            continue
        with accelerator.autocast():
            hyps = model.generate(batch, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        rows += [
            {"uid": u, "ref": r, "hyp": D.normalize_text(h)} for u, r, h in zip(batch["uids"], batch["texts"], hyps)
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
# One run: build, (untrained decode), train, decode, save
# ---------------------------------------------------------------------------------------------------------------------


def run(
    args, splits, modality: str, run_dir: Path, log, audio_rate=None, video_rate=None, decor_weight=None
) -> tuple[dict, object, object]:
    """Train and evaluate one configuration; writes ``run_dir/results.{json,md}`` and returns (results, model)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from transformers import set_seed

    audio_rate = audio_rate or args.audio_rate
    video_rate = video_rate or args.video_rate
    decor_weight = args.decor_weight if decor_weight is None else decor_weight
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        **({"mixed_precision": args.mixed_precision} if args.mixed_precision else {}),
    )
    set_seed(args.seed)
    model, extractor = build_model(args, modality, audio_rate, video_rate, decor_weight)
    train_loader, train_set, sampler, train_collate = make_loader(
        args, splits["train"], modality, extractor, True, args.seed
    )
    test_loader, test_set, _, test_collate = make_loader(args, splits["test"], modality, extractor, False)
    run_dir.mkdir(parents=True, exist_ok=True)

    results: dict = {
        "modality": modality,
        "audio_rate": audio_rate if modality != "vsr" else None,
        "video_rate": video_rate if modality != "asr" else None,
        "projector": args.projector,
        "decor_weight": decor_weight,
        "llm": args.llm,
    }
    if args.eval_untrained and not args.resume:
        results["untrained"] = score(decode(args, accelerator, model, test_loader, f"decode untrained {modality}"))
        log(f"[{modality}] untrained WER {results['untrained']['wer']:.1f}%")
    results["training"] = train(args, accelerator, model, train_loader, sampler, run_dir, modality, log)
    rows = decode(args, accelerator, model, test_loader, f"decode {modality}")
    results["test"] = score(rows)
    skipped = {**train_set.bad, **test_set.bad}
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
    accelerator.free_memory()
    return results, accelerator.unwrap_model(model), extractor


def results_table(results: list[dict]) -> str:
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


# ---------------------------------------------------------------------------------------------------------------------
# The sink experiment in miniature
# ---------------------------------------------------------------------------------------------------------------------


def analysis_batch(model, test_utts, args, extractor, n: int = 8):
    """Teacher-forced sequences of the first ``n`` test utterances, as forward kwargs for the analysis tools."""
    loader, *_ = make_loader(args, test_utts[:n], model.modality, extractor, train=False)
    batch = next(iter(loader))
    with torch.no_grad():
        seq = model.assemble(batch, with_transcript=True)
    return {"inputs_embeds": seq.inputs_embeds, "attention_mask": seq.attention_mask}, seq.segments


def sink_analysis(model, batch: dict, segments: torch.Tensor, args, plot_dir: Path, tag: str) -> dict:
    """Mean BOS-cosine, intermediate sink tokens and top activation of one trained model (+ its plots)."""
    from peft_gnnmoe.analysis.cosine import bos_cosine_similarity
    from peft_gnnmoe.analysis.massive import find_massive_activations
    from peft_gnnmoe.analysis.plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from peft_gnnmoe.analysis.sinks import attention_sink_scores

    cosine = bos_cosine_similarity(model.llm, batch, layers="all")
    sinks = attention_sink_scores(model.llm, batch, threshold=args.sink_threshold)
    massive = find_massive_activations(model.llm, batch, args.massive_magnitude, args.massive_ratio)
    n = batch["attention_mask"].shape[0]
    intermediate = [s for s in sinks.sinks if segments[s["batch"], s["token"]] != M.SEG["bos"]]
    top = max((abs(t["value"]) for layer in massive.layers for t in layer.top), default=0.0)
    median = max((layer.median for layer in massive.layers), default=0.0)
    names = [M.SEGMENTS[s] for s in segments[0].tolist()]
    plot_bos_cosine(cosine, plot_dir / f"{tag}_bos_cosine.png", tokens=names)
    plot_attention_sinks(sinks, plot_dir / f"{tag}_attention_sinks.png", tokens=names)
    plot_massive_activations(massive, plot_dir / f"{tag}_massive_activations.png")
    by_segment: dict[str, int] = {}
    for s in intermediate:
        seg = M.SEGMENTS[segments[s["batch"], s["token"]]]
        by_segment[seg] = by_segment.get(seg, 0) + 1
    return {
        "mean_bos_cosine": cosine.mean,
        "bos_cosine_per_layer": cosine.mean_per_layer,
        "intermediate_sinks_per_utt": round(len(intermediate) / n, 2),
        "intermediate_sinks_by_segment": by_segment,
        "bos_sink_score": round(sum(row[0] for row in sinks.mean_scores) / n, 4),
        "max_intermediate_sink_score": round(
            sum(
                max((v for t, v in enumerate(row) if segments[b, t] not in (M.SEG["bos"], M.SEG["pad"])), default=0.0)
                for b, row in enumerate(sinks.mean_scores)
            )
            / n,
            4,
        ),
        "top_activation": round(top, 2),
        "max_layer_median": round(median, 4),
        "massive_activations": len(massive.massive),
    }


def run_sink_experiment(args, splits, log) -> None:
    """Train with and without the decorrelation loss at a low and a high rate, analyse each model, write one table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modality = args.modality[0]
    low, high = args.sink_rates or ((1, 8) if modality == "vsr" else (2, 16))
    weight = args.decor_weight or 0.1
    out = Path(args.output_dir) / "sinks"
    rows = []
    for rate in (low, high):
        for w in (0.0, weight):
            tag = f"{modality}_rate{rate}_decor{w:g}"
            a_rate = rate if modality != "vsr" else None
            v_rate = rate if modality == "vsr" else (max(1, rate // 2) if modality == "avsr" else None)
            res, model, extractor = run(args, splits, modality, out / tag, log, a_rate, v_rate, w)
            batch, segments = analysis_batch(model, splits["test"], args, extractor)
            stats = sink_analysis(model, batch, segments, args, out / "plots", tag)
            rows.append(
                {
                    "tag": tag,
                    "rate": rate,
                    "decor_weight": w,
                    "wer": res["test"]["wer"],
                    "untrained_wer": res.get("untrained", {}).get("wer"),
                    **stats,
                }
            )
            log(
                f"[sinks] {tag}: WER {res['test']['wer']:.2f}%  BOS-cos {stats['mean_bos_cosine']:.3f}  "
                f"sinks/utt {stats['intermediate_sinks_per_utt']}  top |h| {stats['top_activation']}"
            )
    (out / "sinks.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"Modality `{modality}`, projector `{args.projector}`, λ = {weight}, analysis on 8 test utterances.",
        "",
        "| rate | decor λ | WER % | mean BOS-cosine | intermediate sinks / utt | max non-BOS sink score | "
        "BOS sink score | top \\|activation\\| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate']} | {r['decor_weight']:g} | {r['wer']:.2f} | {r['mean_bos_cosine']:.3f} | "
            f"{r['intermediate_sinks_per_utt']} | {r['max_intermediate_sink_score']:.3f} | "
            f"{r['bos_sink_score']:.3f} | "
            f"{r['top_activation']:.1f} |"
        )
    (out / "sinks.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        axes[0].plot(r["bos_cosine_per_layer"], marker="o", label=f"rate {r['rate']}, λ={r['decor_weight']:g}")
    axes[0].set(xlabel="decoder layer", ylabel="mean cos(h[BOS], h[t])", title="cosine to BOS per layer")
    axes[0].legend(fontsize=8)
    labels = [f"r{r['rate']}\nλ={r['decor_weight']:g}" for r in rows]
    axes[1].bar(labels, [r["wer"] for r in rows], color=["tab:gray", "tab:blue"] * 2)
    axes[1].set(ylabel="test WER %", title="WER with / without decorrelation")
    fig.tight_layout()
    fig.savefig(out / "plots" / "summary.png", dpi=110)
    plt.close(fig)
    log("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0

    def log(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    args.embedded = args.data_dir is None
    if not args.embedded:
        needed = {"--llm": args.llm}
        if {"asr", "avsr"} & set(args.modality):
            needed["--audio_encoder"] = args.audio_encoder
        if {"vsr", "avsr"} & set(args.modality):
            needed["--video_encoder"] = args.video_encoder
        missing = [flag for flag, value in needed.items() if not value]
        if missing:
            raise SystemExit(
                f"with --data_dir, pass {', '.join(missing)} (the embedded models exist only for the "
                "embedded corpus; e.g. --llm meta-llama/Llama-3.2-1B --audio_encoder openai/whisper-medium)"
            )
    args.projector = args.projector or ("avg" if args.experiment == "sinks" else "stack")
    if args.embedded:
        corpus = out / "corpus"
        if is_main:
            log(f"building the embedded corpus in {corpus} (espeak-ng speech + phoneme-timed mouth video)")
            cfg = D.SyntheticCorpusConfig(n_train=args.corpus_train, n_test=args.corpus_test, seed=args.seed)
            D.build_synthetic_corpus(corpus, cfg)
        _wait_for_everyone()
        args.data_dir = str(corpus)
    args.crop_size = args.crop_size or (44 if args.embedded else 88)  # 48 px synthetic frames; LRS3 crops 96 -> 88
    splits = load_splits(args, log)
    if args.embedded:
        if is_main:
            build_embedded_models(args, splits["train"], log)
        _wait_for_everyone()
        paths = embedded_model_paths(args)
        args.llm = args.llm or str(paths["llm"])
        args.audio_encoder = args.audio_encoder or str(paths["audio_encoder"])
        args.video_encoder = args.video_encoder or str(paths["video_encoder"])
    if args.experiment == "sinks":
        run_sink_experiment(args, splits, log)
        return {}
    results = [run(args, splits, m, out / m, log)[0] for m in args.modality]
    table = results_table(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("\n" + table)
    return {r["modality"]: r for r in results}


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


if __name__ == "__main__":
    main()
