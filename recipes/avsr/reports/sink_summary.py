"""Sink statistics over seeds: mean ± std per (rate, before / λ) cell, and with-minus-without paired by seed."""

from __future__ import annotations

from recipes.common.stats import mean_and_interval, mean_std

SUMMARISED = (  # scalar fields averaged over seeds
    "wer",
    "mean_bos_cosine",
    "intermediate_sinks_per_utt",
    "layers_with_intermediate_sinks",
    "max_intermediate_sink_score",
    "bos_sink_score",
    "top_activation",
    "massive_activations",
    "non_bos_massive_tokens",
)


def non_bos_massive_tokens(row: dict) -> int:
    """Tokens other than BOS that carry a massive activation (Sun et al.'s thresholds), over the analysed batch."""
    return sum(v for k, v in row["massive_tokens_by_segment"].items() if k != "bos")


def summarise_cells(rows: list[dict]) -> list[dict]:
    """One entry per (rate, stage, λ) with ``{field: {"mean", "std", "n"}}`` over its seeds (sample std)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["rate"], r["stage"], r["decor_weight"]), []).append(r)
    out = []
    for (rate, stage, weight), group in cells.items():
        entry: dict = {"rate": rate, "stage": stage, "decor_weight": weight, "seeds": [r["seed"] for r in group]}
        for field in SUMMARISED:
            values = [non_bos_massive_tokens(r) if field == "non_bos_massive_tokens" else r.get(field) for r in group]
            if all(v is not None for v in values):
                entry[field] = mean_std(values)
        out.append(entry)
    return out


PAIRED = ("wer", "mean_bos_cosine", "layers_with_intermediate_sinks", "top_activation", "massive_activations")


def paired_by_seed(rows: list[dict], fields: tuple[str, ...] = PAIRED) -> list[dict]:
    """Per rate, λ > 0 and field: the trained run with the loss minus the one without, paired by seed (the same
    initial projectors, LoRA and batches), with the mean and its 95% t-interval (None for one seed)."""
    trained: dict[tuple, dict] = {
        (r["rate"], r["decor_weight"], r["seed"]): r for r in rows if r["stage"] == "trained"
    }
    out = []
    for rate, weight in sorted({(k[0], k[1]) for k in trained if k[1]}):
        seeds = sorted(k[2] for k in trained if k[:2] == (rate, weight) and (rate, 0.0, k[2]) in trained)
        if not seeds:  # no run without the loss to pair with
            continue
        for field in fields:
            diffs = [trained[rate, weight, s][field] - trained[rate, 0.0, s][field] for s in seeds]
            mean, interval = mean_and_interval(diffs)
            entry = {"rate": rate, "decor_weight": weight, "field": field, "seeds": seeds, "diffs": diffs}
            out.append(entry | {"mean": mean, "interval": interval})
    return out
