"""The sink experiment's report: ``sinks.json``, ``summary.json``, ``sinks.md`` and the summary plot."""

from __future__ import annotations

import json
from pathlib import Path

from .sink_summary import paired_by_seed, summarise_cells


def write_report(rows: list[dict], out: Path, modality: str, projector: str, weight: float, llm: str) -> str:
    """Write ``sinks.json`` (every row), ``summary.json`` (mean ± std per cell and the paired differences),
    ``sinks.md`` and ``plots/summary.png`` into ``out``; returns the markdown."""
    summary = summarise_cells(rows)
    paired = paired_by_seed(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sinks.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.json").write_text(json.dumps({"cells": summary, "paired": paired}, indent=1))
    table = sinks_table(summary, modality, projector, weight, llm) + "\n" + paired_table(paired)
    (out / "sinks.md").write_text(table)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_summary(rows, out / "plots" / "summary.png")
    return table


def _cell(entry: dict, field: str, digits: int) -> str:
    if field not in entry:
        return "–"
    value = entry[field]
    if value["n"] == 1:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def sinks_table(summary: list[dict], modality: str, projector: str, weight: float, llm: str = "") -> str:
    """The experiment's markdown table: one row per (rate, before / λ), mean ± std over seeds."""
    seeds = sorted({s for e in summary for s in e["seeds"]})
    lines = [
        f"Modality `{modality}`, LLM `{llm}`, projector `{projector}`, λ = {weight}, analysis on 8 test utterances, "
        f"seeds {', '.join(map(str, seeds))} (mean ± std where more than one).",
        "",
        "| rate | model | WER % | mean BOS-cosine | intermediate sinks / utt | layers with an intermediate sink "
        "| max non-BOS sink score | BOS sink score | top \\|activation\\| | massive activations "
        "| non-BOS massive tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        model = "before fine-tuning" if e["stage"] == "before" else f"λ = {e['decor_weight']:g}"
        cells = [
            _cell(e, "wer", 2),
            _cell(e, "mean_bos_cosine", 3),
            _cell(e, "intermediate_sinks_per_utt", 2),
            _cell(e, "layers_with_intermediate_sinks", 1),
            _cell(e, "max_intermediate_sink_score", 3),
            _cell(e, "bos_sink_score", 3),
            _cell(e, "top_activation", 1),
            _cell(e, "massive_activations", 1),
            _cell(e, "non_bos_massive_tokens", 1),
        ]
        lines.append(f"| {e['rate']} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAIRED_LABELS = {
    "wer": ("WER (points)", 2),
    "mean_bos_cosine": ("mean BOS-cosine", 3),
    "layers_with_intermediate_sinks": ("layers with an intermediate sink", 1),
    "top_activation": ("top |activation|", 0),
    "massive_activations": ("massive entries", 1),
}


def paired_table(paired: list[dict]) -> str:
    """The paired differences (with the loss minus without, by seed) as a markdown table."""
    lines = [
        "With the loss minus without, paired by seed (mean, 95% t-interval over the seeds; one value per seed):",
        "",
        "| rate | λ | measure | mean | 95% interval | per seed |",
        "|---|---|---|---:|---:|---|",
    ]
    for p in paired:
        label, digits = PAIRED_LABELS.get(p["field"], (p["field"], 3))
        interval = "–" if p["interval"] is None else "[" + ", ".join(f"{v:+.{digits}f}" for v in p["interval"]) + "]"
        per_seed = " / ".join(f"{d:+.{digits}f}" for d in p["diffs"])
        cells = [str(p["rate"]), f"{p['decor_weight']:g}", label.replace("|", "\\|"), f"{p['mean']:+.{digits}f}"]
        lines.append("| " + " | ".join([*cells, interval, per_seed]) + " |")
    return "\n".join(lines) + "\n"


def _label(rate: int, stage: str, weight: float | None) -> str:
    return f"rate {rate}, " + ("before" if stage == "before" else f"λ={weight:g}")


def plot_summary(rows: list[dict], path: Path) -> None:
    """Per (rate, before / λ), averaged over seeds: cosine to BOS per layer, top |activation| per layer, and WER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["rate"], r["stage"], r["decor_weight"]), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for (rate, stage, weight), group in cells.items():
        style = {"label": _label(rate, stage, weight), "marker": "o", "ms": 3, "ls": ":" if stage == "before" else "-"}
        axes[0].plot(np.mean([r["bos_cosine_per_layer"] for r in group], axis=0), **style)
        axes[1].plot(np.mean([r["top_activation_per_layer"] for r in group], axis=0), **style)
    axes[0].set(xlabel="decoder layer", ylabel="mean cos(h[BOS], h[t])", title="cosine to BOS per layer")
    axes[1].set(xlabel="decoder layer", ylabel="top |h|", yscale="log", title="largest activation per layer")
    axes[0].legend(fontsize=7)
    trained = [(k, g) for k, g in cells.items() if k[1] == "trained"]
    wers = [[r["wer"] for r in g] for _, g in trained]
    axes[2].bar(
        [_label(*k).replace(", ", "\n") for k, _ in trained],
        [np.mean(w) for w in wers],
        yerr=[np.std(w, ddof=1) if len(w) > 1 else 0 for w in wers],
        color=["tab:gray", "tab:blue"] * len(trained),
        capsize=3,
    )
    axes[2].set(ylabel="test WER %", title="WER without / with decorrelation (± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
