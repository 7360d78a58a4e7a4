"""Seed statistics of training runs: mean ± std per modality, and the fused model against each single stream.

* :func:`seed_summary`: mean and standard deviation over seeds of every reported WER.
* :func:`modality_differences`: the fused model's WER minus a single stream's, paired by seed, with a t-interval.
* :func:`write_seed_report`: ``results.json`` / ``results.md`` (and the WER-against-SNR plot) of a ``--seeds`` run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recipes.common.stats import mean_and_interval, mean_std

from .snr_plot import field_snr, snr_field


def _mean_std(values: list[float]) -> dict:
    summary = mean_std(values)
    return summary | {"mean": round(summary["mean"], 2), "std": round(summary["std"], 2)}


REPORTED = {  # summary field -> how to read it from one run's results
    "wer": lambda r: r["test"]["wer"],
    "cer": lambda r: r["test"]["cer"],
    "chance_wer": lambda r: r.get("chance", {}).get("wer"),
    "wer_swap_video": lambda r: r.get("wer_swap_video"),
    "wer_swap_audio": lambda r: r.get("wer_swap_audio"),
    "real_speech_wer": lambda r: r.get("real_speech", {}).get("wer"),
    "untrained_wer": lambda r: r.get("untrained", {}).get("wer"),
}


def seed_summary(runs: list[dict]) -> dict[str, dict]:
    """``{modality: {field: {"mean", "std", "n"}, "seeds": [...]}}`` over runs that carry a ``seed``; std is the
    sample standard deviation (0 for one seed). Fields a run did not measure are left out."""
    summary: dict[str, dict] = {}
    for modality in dict.fromkeys(r["modality"] for r in runs):
        rows = [r for r in runs if r["modality"] == modality]
        entry: dict = {"seeds": [r["seed"] for r in rows]}
        for field, read in REPORTED.items():
            values = [read(r) for r in rows]
            if all(v is not None for v in values):
                entry[field] = _mean_std(values)
        wers = [_test_wers(r) for r in rows]  # clean and each --test_snrs SNR
        noisy = set.intersection(*(set(w) for w in wers)) - {"wer"}
        for field in sorted(noisy, key=lambda f: float(field_snr(f)), reverse=True):
            entry[field] = _mean_std([w[field] for w in wers])
        summary[modality] = entry
    return summary


def seed_table(summary: dict[str, dict]) -> str:
    """The Markdown table of :func:`seed_summary`: mean ± std (n seeds) per modality, the value alone for one seed
    (no spread measured); – where not measured."""

    def cell(entry: dict, field: str) -> str:
        if field not in entry:
            return "–"
        value = entry[field]
        return f"{value['mean']:.2f}" + (f" ± {value['std']:.2f}" if value["n"] > 1 else "")

    noisy = list(dict.fromkeys(f for entry in summary.values() for f in entry if field_snr(f) is not None))
    headers = "".join(f" | WER at {field_snr(f)} dB %" for f in noisy)
    lines = [
        "| modality | seeds | WER % | CER % | chance WER % | WER swapped video % | WER swapped audio % "
        f"| recorded speech WER % | untrained WER %{headers} |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(noisy),
    ]
    for modality, entry in summary.items():
        cells = " | ".join(cell(entry, f) for f in [*REPORTED, *noisy])
        lines.append(f"| {modality} | {', '.join(map(str, entry['seeds']))} | {cells} |")
    return "\n".join(lines) + "\n"


FUSED_AGAINST = (("avsr", "asr"), ("avsr", "vsr"))  # the audio-visual model against each single stream


def _test_wers(run: dict) -> dict[str, float]:
    """A run's test WERs by summary field: clean (``wer``) and each ``--test_snrs`` SNR."""
    noisy = run.get("test_by_snr", {}).get("snr_db", {})
    return {"wer": run["test"]["wer"]} | {snr_field(snr): v["wer"] for snr, v in noisy.items()}


def modality_differences(runs: list[dict]) -> list[dict]:
    """Per pair of :data:`FUSED_AGAINST` trained on common seeds, and per test WER both decoded (clean, each SNR):
    avsr's WER minus the other's, paired by seed (one seed gives both runs the same batch order), with the mean and
    its 95% t-interval (None for one seed). Empty when no pair was trained."""
    by_key = {(r["modality"], r["seed"]): _test_wers(r) for r in runs}
    out = []
    for fused, single in FUSED_AGAINST:
        seeds = sorted(s for m, s in by_key if m == fused and (single, s) in by_key)
        if not seeds:
            continue
        fields = [f for f in by_key[fused, seeds[0]] if all(f in by_key[m, s] for m in (fused, single) for s in seeds)]
        for field in fields:
            diffs = [round(by_key[fused, s][field] - by_key[single, s][field], 2) for s in seeds]
            mean, interval = mean_and_interval(diffs)
            entry = {"modalities": [fused, single], "field": field, "seeds": seeds, "diffs": diffs}
            out.append(entry | {"mean": mean, "interval": interval})
    return out


def differences_table(differences: list[dict]) -> str:
    """The Markdown table of :func:`modality_differences` (mean [95% interval] in WER points), '' when empty."""
    if not differences:
        return ""
    fields = list(dict.fromkeys(d["field"] for d in differences))
    heads = "".join(" | clean" if f == "wer" else f" | {field_snr(f)} dB" for f in fields)

    def points(x: float) -> str:
        return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"

    def cell(d: dict) -> str:
        low_high = f" [{points(d['interval'][0])}, {points(d['interval'][1])}]" if d["interval"] else ""
        return points(d["mean"]) + low_high

    lines = [
        "WER points, paired by seed (mean, 95% t-interval over the seeds; negative: the fused model is better):",
        "",
        f"| difference | seeds{heads} |",
        "|---|---|" + "---:|" * len(fields),
    ]
    for pair in dict.fromkeys(tuple(d["modalities"]) for d in differences):
        rows = {d["field"]: d for d in differences if tuple(d["modalities"]) == pair}
        seeds = ", ".join(map(str, next(iter(rows.values()))["seeds"]))
        cells = " | ".join(cell(rows[f]) if f in rows else "–" for f in fields)
        lines.append(f"| {pair[0]} − {pair[1]} | {seeds} | {cells} |")
    return "\n".join(lines) + "\n"


def write_seed_report(out_dir: Path, seeds: Sequence[int], data_seed: int | None, runs: list[dict]) -> str:
    """``out_dir/results.json`` (``{"seeds", "data_seed", "runs", "summary", "differences"}``), ``results.md`` (the
    mean ± std table, then the paired differences between modalities) and, when the runs decoded noisy test sets,
    ``wer_by_snr.png``, of per-seed runs; returns the Markdown of ``results.md``."""
    import json

    from .snr_plot import plot_wer_by_snr

    summary = seed_summary(runs)
    differences = modality_differences(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_wer_by_snr(summary, out_dir / "wer_by_snr.png")
    table = differences_table(differences)
    report = seed_table(summary) + (f"\n{table}" if table else "")
    (out_dir / "results.md").write_text(report)
    results = {
        "seeds": list(seeds),
        "data_seed": data_seed,
        "runs": runs,
        "summary": summary,
        "differences": differences,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return report
