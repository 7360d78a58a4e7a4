"""``python -m recipes.avsr.experiments.merge_sinks RUN [RUN ...] --output DIR``: one sink-experiment report from
the seeds of several runs of :mod:`recipes.avsr.experiments.sinks` (for example one seed per process, side by side),
as if one ``--seeds`` run had made them.

Each RUN is a recipe ``--output_dir`` (or its ``sinks/`` folder). Its rows are read from ``sinks/sinks.json``; every
trained cell's ``results.json`` must agree across runs on the settings the table depends on (modality, rates,
projector, λ, CTC weight, LLM, steps, learning rate), and a (seed, cell) may come from one run only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..reports.sink_report import write_report

SETTINGS = ("modality", "audio_rate", "video_rate", "projector", "decor_weight", "llm", "ctc_weight")
TRAINING = ("steps", "lr")


def sinks_dir(run: Path) -> Path:
    """The ``sinks/`` folder of a run's output dir (or the folder itself if it is one)."""
    for candidate in (run / "sinks", run):
        if (candidate / "sinks.json").is_file():
            return candidate
    raise FileNotFoundError(f"{run}: no sinks/sinks.json; pass the --output_dir of a finished sink experiment")


def cell_settings(folder: Path, row: dict) -> dict:
    """The settings of a trained row, from its cell's ``results.json`` (``seed_<S>/<tag>/`` or ``<tag>/``)."""
    for cell in (folder / f"seed_{row['seed']}" / row["tag"], folder / row["tag"]):
        if (cell / "results.json").is_file():
            results = json.loads((cell / "results.json").read_text())
            return {k: results.get(k) for k in SETTINGS} | {k: results["training"].get(k) for k in TRAINING}
    raise FileNotFoundError(f"{folder}: no results.json for seed {row['seed']}, {row['tag']}")


class MergeCheck:
    """What merging runs refuses: a (seed, name) that two runs both hold, and a name whose settings differ."""

    def __init__(self):
        self.owner: dict[tuple, Path] = {}
        self.first: dict[str, tuple[dict, Path]] = {}

    def claim(self, seed: int, name: str, run: Path) -> None:
        """Record that ``run`` holds ``(seed, name)``; raises if an earlier run did."""
        earlier = self.owner.get((seed, name))
        if earlier is not None:
            raise ValueError(f"seed {seed}, {name} is in both {earlier} and {run}: merge distinct seeds")
        self.owner[seed, name] = run

    def same_settings(self, name: str, found: dict, run: Path) -> None:
        """Record ``name``'s settings in ``run``; raises if they differ from the first run's."""
        first, where = self.first.setdefault(name, (found, run))
        differ = {k: (first[k], found[k]) for k in found if found[k] != first[k]}
        if differ:
            raise ValueError(f"{name} was run with other settings in {where} and {run}: {differ}")

    def settings(self) -> dict[str, dict]:
        return {name: found for name, (found, _) in self.first.items()}


def merge(runs: list[Path]) -> tuple[list[dict], dict[str, dict]]:
    """Every run's rows (in the order given) and the settings of each trained cell; raises on a (seed, cell) that
    two runs both have, and on a cell whose settings differ between runs."""
    rows: list[dict] = []
    check = MergeCheck()
    for run in runs:
        folder = sinks_dir(run)
        for row in json.loads((folder / "sinks.json").read_text()):
            check.claim(row["seed"], row["tag"], run)
            rows.append(row)
            if row["stage"] == "trained":
                check.same_settings(row["tag"], cell_settings(folder, row), run)
    return rows, check.settings()


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m recipes.avsr.experiments.merge_sinks", description=__doc__.splitlines()[0]
    )
    p.add_argument("runs", nargs="+", type=Path, help="output dirs of finished sink-experiment runs")
    p.add_argument("--output", type=Path, required=True, help="where sinks.json, summary.json, sinks.md, plots go")
    args = p.parse_args(argv)
    rows, settings = merge(args.runs)
    any_cell = next(iter(settings.values()))
    weights = sorted({s["decor_weight"] for s in settings.values()} - {0.0})
    weight = weights[0] if len(weights) == 1 else ", ".join(map(str, weights))
    table = write_report(rows, args.output, any_cell["modality"], any_cell["projector"], weight, any_cell["llm"])
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
