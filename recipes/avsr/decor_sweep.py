"""Choosing the decorrelation weight λ on validation data (``--experiment decor_sweep``).

At the high compression rate of ``--sink_rates`` (where the sink paper sees the loss matter), train once per λ of
``--decor_weights`` (0 is the baseline) and measure the teacher-forced loss on ``--val_utts`` held-out *training*
utterances (the CE alone: the decorrelation term is only added in training mode). The λ of lowest final validation
loss, averaged over ``--seeds``, is the chosen one; the test WER and the sink statistics of every λ are reported
next to it but play no part in the choice. Writes ``decor_sweep/sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from recipes.common.stats import mean_std

from .config import RunConfig
from .data.lrs3 import Utterance
from .loop import Log, run
from .sink_stats import analysis_batch, sink_analysis
from .sinks import rate_overrides

_REPORTED = ("val_loss", "wer", "mean_bos_cosine", "top_activation", "massive_activations", "layers_with_sinks")


def run_decor_sweep(
    config: RunConfig, accelerator: Accelerator, splits: dict[str, list[Utterance]], log: Log
) -> dict | None:
    """Train and analyse one model per (seed, λ); returns the summary (main process) with the ``chosen`` λ."""
    modality = config.modalities[0]
    rate = config.sinks.rates[1]
    rates = rate_overrides(modality, rate)
    out = config.output_dir / "decor_sweep"
    seeds = config.seeds or (config.seed,)
    rows = []
    for seed in seeds:
        for weight in config.sinks.sweep_weights:
            tag = f"{modality}_rate{rate}_decor{weight:g}"
            run_dir = out / f"seed_{seed}" / tag
            model_config = replace(config.model, decor_weight=weight, **rates)
            res, model, extractor = run(
                replace(config, seed=seed), accelerator, splits, modality, run_dir, log, model_config
            )
            batch, segments = analysis_batch(model, splits["test"], config.loader, extractor)
            stats = sink_analysis(model, batch, segments, config.sinks, run_dir / "plots", tag)
            # train_log.json is written by the main process only (the other processes' rows are never used)
            val = _final_validation_loss(run_dir) if accelerator.is_main_process else None
            rows.append(
                {
                    "seed": seed,
                    "rate": rate,
                    "decor_weight": weight,
                    "val_loss": val,
                    "wer": res["test"]["wer"],
                    "mean_bos_cosine": stats["mean_bos_cosine"],
                    "top_activation": stats["top_activation"],
                    "massive_activations": stats["massive_activations"],
                    "layers_with_sinks": stats["layers_with_intermediate_sinks"],
                    "massive_tokens_by_segment": stats["massive_tokens_by_segment"],
                }
            )
            log(f"[decor_sweep] seed {seed} λ={weight:g}: validation loss {val}, test WER {res['test']['wer']:.2f}%")
            del model
    if not accelerator.is_main_process:
        return None
    summary = summarise_sweep(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    table = sweep_table(summary, modality)
    (out / "sweep.md").write_text(table)
    plot_sweep(summary, out / "sweep.png")
    log(table.rstrip("\n"))
    return summary


def _final_validation_loss(run_dir: Path) -> float:
    """The validation loss after the last epoch, from the run's ``train_log.json``."""
    history = json.loads((run_dir / "train_log.json").read_text())
    losses = [h["val_loss"] for h in history if "val_loss" in h]
    if not losses:
        raise RuntimeError(f"{run_dir} logged no validation loss: the sweep needs --val_utts > 0")
    return losses[-1]


def summarise_sweep(rows: list[dict]) -> dict:
    """Per λ the mean (and std over seeds) of every reported figure; ``chosen`` = the λ of lowest mean validation
    loss (ties: the smaller λ)."""
    cells = []
    for weight in sorted({r["decor_weight"] for r in rows}):
        group = [r for r in rows if r["decor_weight"] == weight]
        cell = {"decor_weight": weight, "seeds": [r["seed"] for r in group]}
        for field in _REPORTED:
            cell[field] = mean_std([float(r[field]) for r in group])
        cells.append(cell)
    chosen = min(cells, key=lambda c: (c["val_loss"]["mean"], c["decor_weight"]))["decor_weight"]
    return {"rate": rows[0]["rate"], "chosen": chosen, "cells": cells, "rows": rows}


def sweep_table(summary: dict, modality: str) -> str:
    """Markdown: one row per λ, mean ± std over seeds; the chosen λ in bold."""
    seeds = summary["cells"][0]["seeds"]
    lines = [
        f"Decorrelation-weight sweep, {modality}, rate {summary['rate']}, seeds {', '.join(map(str, seeds))}: chosen "
        f"λ = {summary['chosen']:g} (lowest validation loss; test WER and sink statistics not used).",
        "",
        "| λ | validation loss | test WER % | mean BOS-cosine | top \\|activation\\| | massive entries | layers with "
        "an intermediate sink |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in summary["cells"]:
        weight = f"**{c['decor_weight']:g}**" if c["decor_weight"] == summary["chosen"] else f"{c['decor_weight']:g}"
        cols = [_cell(c[f], d) for f, d in zip(_REPORTED, (4, 2, 3, 0, 0, 1))]
        lines.append(f"| {weight} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: dict, digits: int) -> str:
    if value["n"] == 1:
        return f"{value['mean']:,.{digits}f}"
    return f"{value['mean']:,.{digits}f} ± {value['std']:,.{digits}f}"


def plot_sweep(summary: dict, path: Path) -> None:
    """Validation loss, test WER, mean cosine to BOS and the largest activation against λ (log axis, λ = 0 at the
    left edge), ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    positive = [c["decor_weight"] for c in cells if c["decor_weight"] > 0]
    zero_at = min(positive) / 10 if positive else 1.0
    xs = [c["decor_weight"] or zero_at for c in cells]
    panels = (
        ("val_loss", "validation loss (CE)"),
        ("wer", "test WER %"),
        ("mean_bos_cosine", "mean cos(h[BOS], h[t])"),
        ("top_activation", "top |h| (any layer)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.5))
    for ax, (field, label) in zip(axes, panels):
        ax.errorbar(
            xs, [c[field]["mean"] for c in cells], yerr=[c[field]["std"] for c in cells], marker="o", capsize=3
        )
        ax.axvline(summary["chosen"] or zero_at, color="tab:green", ls=":", label=f"chosen λ={summary['chosen']:g}")
        ax.set(xscale="log", xlabel="λ", ylabel=label, title=label)
        ax.set_xticks(xs, [f"{c['decor_weight']:g}" for c in cells])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"decorrelation weight sweep, rate {summary['rate']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
