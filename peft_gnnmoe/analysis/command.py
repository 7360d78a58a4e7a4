"""``peft-gnnmoe analyze``: massive activations, attention sinks and cosine-to-BOS of a model on text or images.

Writes ``report.json`` and three PNG plots to ``--output-dir``. ``--model`` is any transformers causal LM: a Hub id
or a local folder, loaded with ``AutoModelForCausalLM.from_pretrained``. With ``--image`` (a file or
``skimage:NAME``, repeatable) the model is a vision transformer (Hub id or folder) and CLS plays the part of BOS; see
``vision_command.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of "
    "Germany."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help=__doc__.splitlines()[0], description=__doc__)
    parser.add_argument("--model", required=True, help="a transformers model id on the Hub, or a local model folder")
    parser.add_argument("--adapter", help="optional PEFT adapter folder to load on top of the model")
    parser.add_argument("--text", action="append", help="input text (repeat for a batch); default: a fixed sentence")
    parser.add_argument("--image", action="append", help="an image file or skimage:NAME (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each text in the tokenizer's chat template")
    parser.add_argument("--input-ids", help="comma-separated token ids instead of --text (models without tokenizer)")
    parser.add_argument("--max-length", type=int, default=256, help="truncate inputs to this many tokens")
    parser.add_argument("--magnitude-threshold", type=float, default=100.0, help="massive: |value| above this")
    parser.add_argument("--ratio-threshold", type=float, default=1000.0, help="massive: |value| / median above this")
    parser.add_argument("--sink-threshold", type=float, default=0.3, help="sink: mean attention received above this")
    parser.add_argument("--sink-ratio", type=float, default=2.0, help="sink: and above this x the uniform baseline")
    parser.add_argument("--head-layer", type=int, help="layer of the per-head sink panel (default: strongest sink)")
    parser.add_argument("--bos", choices=("first", "token"), default="first", help="BOS = first token or bos_token_id")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on, e.g. cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="weights' dtype (bf16/fp16 halve memory)"
    )
    parser.add_argument("--output-dir", required=True, help="folder for report.json and the PNG plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from .report import analyze
    from .summary import summary

    device = _device(args.device)
    if args.image:
        from .vision_command import run_images

        return run_images(args, device, getattr(torch, DTYPES[args.dtype]))
    model, tokenizer = _load(args.model, getattr(torch, DTYPES[args.dtype]))
    if args.adapter:
        from peft import PeftModel

        import peft_gnnmoe  # noqa: F401  (registers the custom PEFT types)

        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(device)
    if args.input_ids:
        ids = torch.tensor([[int(i) for i in args.input_ids.split(",")]])[:, : args.max_length]
        batch, tokens, text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, None
    else:
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer: pass --input-ids.")
        batch = tokenize(tokenizer, args.text or [DEFAULT_TEXT], args.chat, args.max_length)
        # one entry per position (padding included), so that report positions index them directly
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
        text = [
            [tokenizer.decode([i]) if m else "" for i, m in zip(ids, mask)]
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
        ]
    if args.bos == "token":
        _check_bos(model, batch)
    _check_head_layer(model, args.head_layer)

    report = analyze(
        model,
        {k: v.to(device) for k, v in batch.items()},
        magnitude_threshold=args.magnitude_threshold,
        ratio_threshold=args.ratio_threshold,
        sink_threshold=args.sink_threshold,
        sink_ratio=args.sink_ratio,
        bos=args.bos,
        tokens=tokens,
    )
    report.update(model=args.model, adapter=args.adapter, device=str(device), dtype=args.dtype, token_text=text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    labels = text[0] if text else None
    plot_massive_activations(report["massive_activations"], out / "massive_activations.png")
    plot_attention_sinks(report["attention_sinks"], out / "attention_sinks.png", labels, layer=args.head_layer)
    plot_bos_cosine(report["bos_cosine"], out / "bos_cosine.png", labels)
    print(summary(report, out))
    return 0


def tokenize(tokenizer, texts: list[str], chat: bool = False, max_length: int = 256) -> dict:
    """``input_ids`` and ``attention_mask`` (padded on the tokenizer's ``padding_side``) with exactly one BOS.

    A chat template writes its own special tokens, so chat texts are tokenized without adding them; BOS is then
    prepended only when the tokenizer adds one to plain text and the template did not write it.
    """
    import torch

    if chat:
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered]
        bos = _added_bos(tokenizer)
        if bos is not None:
            rows = [row if row[:1] == [bos] else [bos, *row] for row in rows]
    else:
        rows = [tokenizer(t)["input_ids"] for t in texts]
    rows = [row[:max_length] for row in rows]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if tokenizer.padding_side == "right" else slice(length - len(row), length)
        ids[b, span], mask[b, span] = torch.tensor(row, dtype=torch.long), 1
    return {"input_ids": ids, "attention_mask": mask}


def _added_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of plain text, or None when it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def _check_bos(model, batch: dict) -> None:
    """``--bos token`` needs the model's bos_token_id in every sequence: a clear message instead of a traceback."""
    from ..utils.model_introspection import bos_token_id

    bos = bos_token_id(model)
    if bos is None:
        raise SystemExit("--bos token: the model config has no bos_token_id. Use --bos first (the first token).")
    present = ((batch["input_ids"] == bos) & batch["attention_mask"].bool()).any(dim=1)
    if not present.all():
        rows = (~present).nonzero().flatten().tolist()
        raise SystemExit(
            f"--bos token: sequence(s) {rows} contain no BOS token (id {bos}); this tokenizer does not add one. "
            "Use --bos first (the first token), or --input-ids that start with the BOS id."
        )


def _check_head_layer(model, layer: int | None) -> None:
    from ..utils.model_introspection import find_decoder_layers

    if layer is None:
        return
    num_layers = len(find_decoder_layers(model)[1])
    if not 0 <= layer < num_layers:
        raise SystemExit(
            f"--head-layer {layer} does not exist: the model has {num_layers} layers (0..{num_layers - 1})."
        )


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise SystemExit(f"--device {name!r} is not usable here: {exc}") from None
    return device


def _load(name: str, dtype):
    """``(model, tokenizer or None)`` of a causal LM given as a Hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as exc:  # no such folder, not on the Hub, or offline without a cached copy
        raise SystemExit(f"--model {name!r}: cannot load a causal LM from it ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer
