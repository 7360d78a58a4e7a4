"""The sink paper's experiment in miniature (arXiv 2510.22603): train with and without the decorrelation loss at a
low and a high compression rate, then measure BOS-cosine, attention sinks and massive activations of each model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import RunConfig, SinkConfig
from .data.collate import matching_video_rate
from .data.loader import LoaderConfig, make_loader
from .data.lrs3 import Utterance
from .loop import Log, run
from .model import SEG, SEGMENTS, AVSRModel


def analysis_batch(model: AVSRModel, test_utts: list[Utterance], loader_config: LoaderConfig, extractor, n: int = 8):
    """Teacher-forced sequences of the first ``n`` test utterances, as forward kwargs for the analysis tools."""
    loader = make_loader(loader_config, test_utts[:n], model.modality, extractor, model.tokenizer, train=False)
    batch = next(iter(loader))
    with torch.no_grad():
        seq = model.assemble(batch, with_transcript=True)
    return {"inputs_embeds": seq.inputs_embeds, "attention_mask": seq.attention_mask}, seq.segments


def sink_analysis(
    model: AVSRModel, batch: dict, segments: torch.Tensor, config: SinkConfig, plot_dir: Path, tag: str
) -> dict:
    """Mean BOS-cosine, intermediate sink tokens and top activation of one trained model (+ its plots)."""
    from peft_gnnmoe.analysis.cosine import bos_cosine_similarity
    from peft_gnnmoe.analysis.massive import find_massive_activations
    from peft_gnnmoe.analysis.plotting import plot_attention_sinks, plot_bos_cosine, plot_massive_activations
    from peft_gnnmoe.analysis.sinks import attention_sink_scores

    cosine = bos_cosine_similarity(model.llm, batch, layers="all")
    sinks = attention_sink_scores(model.llm, batch, threshold=config.threshold)
    massive = find_massive_activations(model.llm, batch, config.massive_magnitude, config.massive_ratio)
    n = batch["attention_mask"].shape[0]
    intermediate = [s for s in sinks.sinks if segments[s["batch"], s["token"]] != SEG["bos"]]
    top = max((abs(t["value"]) for layer in massive.layers for t in layer.top), default=0.0)
    median = max((layer.median for layer in massive.layers), default=0.0)
    names = [SEGMENTS[s] for s in segments[0].tolist()]
    plot_bos_cosine(cosine, plot_dir / f"{tag}_bos_cosine.png", tokens=names)
    plot_attention_sinks(sinks, plot_dir / f"{tag}_attention_sinks.png", tokens=names)
    plot_massive_activations(massive, plot_dir / f"{tag}_massive_activations.png")
    by_segment: dict[str, int] = {}
    for s in intermediate:
        seg = SEGMENTS[segments[s["batch"], s["token"]]]
        by_segment[seg] = by_segment.get(seg, 0) + 1
    return {
        "mean_bos_cosine": cosine.mean,
        "bos_cosine_per_layer": cosine.mean_per_layer,
        "intermediate_sinks_per_utt": round(len(intermediate) / n, 2),
        "intermediate_sinks_by_segment": by_segment,
        "bos_sink_score": round(sum(row[0] for row in sinks.mean_scores) / n, 4),
        "max_intermediate_sink_score": round(
            sum(
                max((v for t, v in enumerate(row) if segments[b, t] not in (SEG["bos"], SEG["pad"])), default=0.0)
                for b, row in enumerate(sinks.mean_scores)
            )
            / n,
            4,
        ),
        "top_activation": round(top, 2),
        "max_layer_median": round(median, 4),
        "massive_activations": len(massive.massive),
    }


def run_sink_experiment(
    config: RunConfig, accelerator: Accelerator, splits: dict[str, list[Utterance]], log: Log
) -> None:
    """Train with and without the decorrelation loss at a low and a high rate, analyse each model, write one table."""
    modality = config.modalities[0]
    low, high = config.sinks.rates
    weight = config.sinks.weight
    out = config.output_dir / "sinks"
    rows = []
    for rate in (low, high):
        for w in (0.0, weight):
            tag = f"{modality}_rate{rate}_decor{w:g}"
            rates = {"video_rate": rate} if modality == "vsr" else {"audio_rate": rate}
            if modality == "avsr":
                rates["video_rate"] = matching_video_rate(rate)  # video tokens at (about) the audio tokens' rate
            model_config = replace(config.model, decor_weight=w, **rates)
            res, model, extractor = run(config, accelerator, splits, modality, out / tag, log, model_config)
            batch, segments = analysis_batch(model, splits["test"], config.loader, extractor)
            stats = sink_analysis(model, batch, segments, config.sinks, out / "plots", tag)
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
    table = sinks_table(rows, modality, config.model.projector, weight)
    (out / "sinks.md").write_text(table)
    plot_summary(rows, out / "plots" / "summary.png")
    log(table.rstrip("\n"))


def sinks_table(rows: list[dict], modality: str, projector: str, weight: float) -> str:
    """The experiment's markdown table: one row per (rate, λ)."""
    lines = [
        f"Modality `{modality}`, projector `{projector}`, λ = {weight}, analysis on 8 test utterances.",
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
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], path: Path) -> None:
    """Cosine to BOS per layer and WER of every (rate, λ), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        axes[0].plot(r["bos_cosine_per_layer"], marker="o", label=f"rate {r['rate']}, λ={r['decor_weight']:g}")
    axes[0].set(xlabel="decoder layer", ylabel="mean cos(h[BOS], h[t])", title="cosine to BOS per layer")
    axes[0].legend(fontsize=8)
    labels = [f"r{r['rate']}\nλ={r['decor_weight']:g}" for r in rows]
    axes[1].bar(labels, [r["wer"] for r in rows], color=["tab:gray", "tab:blue"] * 2)
    axes[1].set(ylabel="test WER %", title="WER with / without decorrelation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
