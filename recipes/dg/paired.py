"""Paired comparisons of a DG sweep: GNN-MoE minus each other method on the same (held-out domain, trial) runs.

Runs of two methods with the same held-out domain and trial seed share the data split, the batches, the augmentation
and the head initialisation, so their difference is paired: its mean over the pairs and a 95% t-interval say more
than two overlapping mean ± std columns.
"""

from __future__ import annotations

from collections import defaultdict

from recipes.common.stats import mean_and_interval

GRAPH_ROUTED = "gnnmoe-"  # method names of GNN-MoE runs; gnnmoe-linear is the token-router ablation, not a reference


def reference_methods(methods: list[str]) -> list[str]:
    """The GNN-MoE methods with a graph router (the ones the comparisons are about)."""
    return [m for m in methods if m.startswith(GRAPH_ROUTED) and m != "gnnmoe-linear"]


def paired_differences(
    results: list[dict], methods: list[str], level: float = 0.95, references: list[str] | None = None
) -> list[dict]:
    """For every reference method (default: the graph-routed GNN-MoE methods) and every other method: test accuracy
    difference in points over the common (test_env, trial) pairs, its mean, ``level`` t-interval (None for a single
    pair) and the pairs won."""
    acc = defaultdict(dict)
    for r in results:
        acc[r["method"]][(r["test_env"], r["trial"])] = 100 * r["test_acc"]
    rows = []
    for ref in reference_methods(methods) if references is None else references:
        for other in methods:
            keys = sorted(set(acc[ref]) & set(acc[other]))
            if other == ref or not keys:
                continue
            diffs = [acc[ref][k] - acc[other][k] for k in keys]
            mean, interval = mean_and_interval(diffs, level)
            wins = sum(d > 0 for d in diffs)
            rows.append(
                {"method": ref, "minus": other, "pairs": len(diffs), "mean": mean, "interval": interval, "wins": wins}
            )
    return rows


def last_checkpoint_share(results: list[dict], steps: int) -> dict[str, list[int]]:
    """Per method, ``[runs whose selected checkpoint is the last one, runs]``: a high share means still learning."""
    share = defaultdict(lambda: [0, 0])
    for r in results:
        share[r["method"]][0] += r["selected_step"] == steps
        share[r["method"]][1] += 1
    return dict(share)


def markdown_paired(rows: list[dict]) -> str:
    """The paired differences as a Markdown table."""
    lines = ["| method | minus | mean (points) | 95% interval | pairs won |", "|---|---|---:|---:|---:|"]
    for r in rows:
        interval = "–" if r["interval"] is None else f"[{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}]"
        lines.append(f"| {r['method']} | {r['minus']} | {r['mean']:+.2f} | {interval} | {r['wins']} / {r['pairs']} |")
    return "\n".join(lines)
