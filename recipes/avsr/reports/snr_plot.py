"""The WER against SNR of a seed report (``--test_snrs``): mean ± std over seeds per modality, clean at the right."""

from __future__ import annotations

from pathlib import Path


def snr_field(snr: str) -> str:
    """The summary field of the test WER at ``snr`` dB (``--test_snrs``)."""
    return f"wer_at_{snr}_db"


def field_snr(field: str) -> str | None:
    """The SNR (dB, as written) of a :func:`snr_field`, None for any other field."""
    return field.removeprefix("wer_at_").removesuffix("_db") if field.startswith("wer_at_") else None


def plot_wer_by_snr(summary: dict[str, dict], out: str | Path) -> Path | None:
    """Plot every modality of a :func:`~.seed_report.seed_summary` that holds ``wer_at_<S>_db`` fields;
    returns the path, or None when no modality was decoded with noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for modality, entry in summary.items():
        snrs = sorted((float(field_snr(f)), f) for f in entry if field_snr(f) is not None)
        if snrs:
            curves[modality] = snrs
    if not curves:
        return None
    clean_x = max(snr for snrs in curves.values() for snr, _ in snrs) + 5
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for modality, snrs in curves.items():
        entry = summary[modality]
        xs = [snr for snr, _ in snrs] + [clean_x]
        cells = [entry[f] for _, f in snrs] + [entry["wer"]]
        ax.errorbar(xs, [c["mean"] for c in cells], yerr=[c["std"] for c in cells], marker="o", capsize=3,
                    label=f"{modality} ({len(entry['seeds'])} seeds)")  # fmt: skip
    chance = next((e["chance_wer"]["mean"] for e in summary.values() if "chance_wer" in e), None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance (constant transcript)")
    ticks = sorted({snr for snrs in curves.values() for snr, _ in snrs})
    ax.set_xticks([*ticks, clean_x], [f"{t:g}" for t in ticks] + ["clean"])
    ax.set_xlabel("SNR of the test audio (dB)")
    ax.set_ylabel("WER % (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
