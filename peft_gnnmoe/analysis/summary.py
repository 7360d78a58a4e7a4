"""The text summary ``peft-gnnmoe analyze`` prints: massive activations, sinks (mean and per layer), cosine to BOS."""

from __future__ import annotations

from pathlib import Path


def summary(report: dict, out: Path) -> str:
    """The lines ``peft-gnnmoe analyze`` prints about a report written to ``out``."""
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
    name = _token_namer(report)
    lines.append(
        f"attention sinks (score > {sinks['threshold']:g} and > {sinks['ratio']:g} x uniform attention), mean over "
        "layers: "
        + (", ".join(f"{name(s)} ({s['score']:.2f}, {s['relative']:.1f}x)" for s in sinks["sinks"]) or "none")
    )
    per_layer = [f"{name(s)} at {_ranges(s['layers'])} (max {max(s['scores']):.2f})" for s in sinks["layer_sinks"]]
    lines.append("  per layer: " + ("; ".join(per_layer) or "none"))
    cosine = report["bos_cosine"]
    lines.append(f"mean cosine to BOS over layers: {cosine['mean']:.3f}")
    lines.append(f"wrote {out / 'report.json'} and 3 PNG plots")
    return "\n".join(lines)


def _token_namer(report: dict):
    """``s -> "token 6 'the'"`` (``"[1] token 6 ..."`` for other sequences than the first)."""
    text = report.get("token_text")

    def name(entry: dict) -> str:
        b, t = entry["batch"], entry["token"]
        label = f"token {t}" if b == 0 else f"[{b}] token {t}"
        return f"{label} {text[b][t].strip()!r}" if text else label

    return name


def _ranges(values: list[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``"layers 2-4, 7"``."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ("layer " if len(values) == 1 else "layers ") + ", ".join(parts)
