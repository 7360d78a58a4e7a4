"""``python -m recipes.avsr.reports.loss_plot LABEL=TRAIN_LOG [...] --out PNG``: the transcript's cross-entropy per
training step of several runs on one plot (running mean over ``--window`` steps), read from their ``train_log.json``.

The CE is the part of the loss every run shares: ``ce`` where a run logged its loss in parts (sink decorrelation, the
CTC alignment loss), ``loss`` otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ce_per_step(train_log: str | Path) -> tuple[list[int], list[float]]:
    """Steps and the transcript CE at each, from a run's ``train_log.json`` (validation rows skipped)."""
    rows = [r for r in json.loads(Path(train_log).read_text()) if "loss" in r]
    if not rows:
        raise ValueError(f"{train_log}: no training step logged")
    return [r["step"] for r in rows], [r.get("ce", r["loss"]) for r in rows]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    if window < 1:
        raise ValueError(f"the window must be >= 1 step, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_ce(logs: dict[str, str | Path], out: str | Path, window: int = 25) -> Path:
    """One curve per ``label: train_log.json``; returns the written path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, path in logs.items():
        steps, ce = ce_per_step(path)
        ax.plot(steps, running_mean(ce, window), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"transcript CE (nats/token, mean of {window} steps)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipes.avsr.reports.loss_plot", description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", metavar="LABEL=TRAIN_LOG", help="a curve's label and its train_log.json")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--window", type=int, default=25)
    args = p.parse_args(argv)
    pairs = [item.partition("=") for item in args.logs]
    bad = [item for item, (_, eq, path) in zip(args.logs, pairs) if not eq or not path]
    if bad:
        p.error(f"each curve is LABEL=path/to/train_log.json, got {bad}")
    return plot_ce({label: path for label, _, path in pairs}, args.out, args.window)


if __name__ == "__main__":
    main()
