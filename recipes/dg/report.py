"""Results of a DG sweep as files: the table (JSON + Markdown), learning curves and a chart.

The routing pictures are drawn by the library (``peft_gnnmoe.tuners.gnnmoe.routing_figure``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from .paired import last_checkpoint_share, markdown_paired, paired_differences


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float) * 100
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(arr)}


def aggregate(results: list[dict], domains: list[str], methods: list[str]) -> dict:
    """The table: per method, test accuracy (%) per held-out domain and their average, mean ± std over trials.

    The average of a trial is the mean over held-out domains; its mean ± std runs over the trials that have every
    domain (DomainBed's way). ``std`` is numpy's (population) standard deviation.
    """
    by = defaultdict(dict)  # (method) -> {(test_env, trial): result}
    for r in results:
        by[r["method"]][(r["test_env"], r["trial"])] = r
    envs = sorted({r["test_env"] for r in results})
    rows = {}
    for method in methods:
        runs = by.get(method, {})
        if not runs:
            continue
        row = {
            "trainable_params": next(iter(runs.values()))["trainable_params"],
            "total_params": next(iter(runs.values()))["total_params"],
            "domains": {},
        }
        trials = sorted({t for _, t in runs})
        for e in envs:
            accs = [runs[(e, t)]["test_acc"] for t in trials if (e, t) in runs]
            if accs:
                row["domains"][domains[e]] = _mean_std(accs) | {
                    "selected_steps": [runs[(e, t)]["selected_step"] for t in trials if (e, t) in runs]
                }
        complete = [t for t in trials if all((e, t) in runs for e in envs)]
        if complete:
            row["avg"] = _mean_std([np.mean([runs[(e, t)]["test_acc"] for e in envs]) for t in complete])
        row["train_seconds"] = round(sum(r["train_seconds"] for r in runs.values()), 1)
        rows[method] = row
    return {"domains": [domains[e] for e in envs], "methods": rows}


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(table: dict) -> str:
    """The table as Markdown: mean ± std per cell, the best mean of each column in bold."""
    domains = table["domains"]
    lines = [
        "| Method | Trainable params | " + " | ".join(domains) + " | Avg |",
        "|---|---:|" + "---:|" * (len(domains) + 1),
    ]
    best = {}
    for d in domains + ["avg"]:
        vals = [(row["domains"].get(d) if d != "avg" else row.get("avg")) for row in table["methods"].values()]
        vals = [v["mean"] for v in vals if v]
        best[d] = max(vals) if vals else None
    for method, row in table["methods"].items():
        cells = []
        for d in domains + ["avg"]:
            v = row["domains"].get(d) if d != "avg" else row.get("avg")
            if not v:
                cells.append("–")
                continue
            text = f"{v['mean']:.1f} ± {v['std']:.1f}"
            cells.append(f"**{text}**" if best[d] is not None and np.isclose(v["mean"], best[d]) else text)
        lines.append(f"| {method} | {_params(row['trainable_params'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    output_dir: str,
    results: list[dict],
    domains: list[str],
    methods: list[str],
    protocol: dict,
    skipped_images: dict | None = None,
) -> dict:
    """Writes results.json, results.md, curves.png and chart.png; returns the table (with the paired differences of
    GNN-MoE against every other method and, per method, how many runs selected their last checkpoint).

    ``skipped_images`` (``{"count", "files", "reasons"}``: unreadable files of a data folder left out by
    ``--skip_bad_images``) goes to results.json as is and, when any were left out, to results.md.
    """
    paired = paired_differences(results, methods)
    last = last_checkpoint_share(results, protocol.get("steps"))
    table = aggregate(results, domains, methods) | {"paired": paired, "last_checkpoint": last, "protocol": protocol}
    if skipped_images is not None:
        table["skipped_images"] = skipped_images
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(table, f, indent=2)
    note = (
        f"Test-domain accuracy (%) of the checkpoint selected by training-domain validation, mean ± std over "
        f"{len(protocol.get('trial_seeds', []))} trial seeds; {protocol.get('steps')} steps, "
        f"{protocol.get('batch_size_per_domain')} images per training domain per step; backbone "
        f"`{protocol.get('backbone')}`.\n\n"
    )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(f"# {protocol.get('dataset')}\n\n{note}{markdown_table(table)}\n")
        if paired:
            f.write("\nPaired differences over the (held-out domain, trial) runs, test accuracy:\n\n")
            f.write(markdown_paired(paired) + "\n")
        f.write("\nRuns that selected their last checkpoint: ")
        f.write(", ".join(f"{m} {k}/{n}" for m, (k, n) in last.items()) + "\n")
        if skipped_images and skipped_images["count"]:
            f.write(f"\n{markdown_skipped(skipped_images)}\n")
    plot_curves(os.path.join(output_dir, "curves.png"), results, domains, methods)
    plot_chart(os.path.join(output_dir, "chart.png"), table)
    return table


def markdown_skipped(skipped: dict, shown: int = 20) -> str:
    """One line naming the unreadable image files left out of the data (the first ``shown``; all in results.json)."""
    files = ", ".join(f"`{f}`" for f in skipped["files"][:shown])
    more = f" and {skipped['count'] - shown} more" if skipped["count"] > shown else ""
    return (
        f"Unreadable image files left out (`--skip_bad_images`): {skipped['count']}: {files}{more} "
        "(reasons in results.json)."
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str, results: list[dict], domains: list[str], methods: list[str]) -> None:
    """One panel per held-out domain: test accuracy (solid) and training-domain validation accuracy (dashed)
    against steps, mean over trials."""
    plt = _plt()
    envs = sorted({r["test_env"] for r in results})
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.6), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, e in zip(axes[0], envs):
        for k, method in enumerate(methods):
            runs = [r for r in results if r["method"] == method and r["test_env"] == e]
            if not runs:
                continue
            steps = [rec["step"] for rec in runs[0]["records"]]
            n = min(len(r["records"]) for r in runs)
            test = np.mean([[rec["test_acc"] for rec in r["records"][:n]] for r in runs], axis=0) * 100
            val = np.mean([[rec["val_acc"] for rec in r["records"][:n]] for r in runs], axis=0) * 100
            ax.plot(steps[:n], test, color=colors(k), label=method)
            ax.plot(steps[:n], val, color=colors(k), linestyle="--", alpha=0.6)
        ax.set_title(f"held out: {domains[e]}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)  — test, -- train-domain val")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_chart(path: str, table: dict) -> None:
    """Grouped bars: test accuracy per held-out domain and average, one bar per method, ± std whiskers."""
    plt = _plt()
    groups = table["domains"] + ["Avg"]
    methods = list(table["methods"])
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 3.8))
    colors = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        row = table["methods"][method]
        cells = [row["domains"].get(g) for g in table["domains"]] + [row.get("avg")]
        means = [c["mean"] if c else 0 for c in cells]
        stds = [c["std"] if c else 0 for c in cells]
        x = np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(
            x,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=colors(k),
            label=f"{method} ({_params(row['trainable_params'])})",
        )
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("held-out domain accuracy (%)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
