"""The λ sweep's report: a Markdown table (the chosen λ in bold) and a plot against λ."""

from __future__ import annotations

from pathlib import Path

from .sweep_summary import REPORTED


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
        cols = [_cell(c[f], d) for f, d in zip(REPORTED, (4, 2, 3, 0, 0, 1))]
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
