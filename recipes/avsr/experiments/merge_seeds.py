"""``python -m recipes.avsr.experiments.merge_seeds RUN [RUN ...] --output DIR``: one mean ± std report from
training runs made in separate processes (for example one seed per process, side by side), as if one ``--seeds``
run had made them.

Each RUN is a recipe ``--output_dir``: a plain run (``results.json`` holds a list of results, one per modality) or a
``--seeds`` run (``{"runs": [...]}``). Runs must share their corpus (the embedded corpus's fingerprint, when there is
one) and, per modality, the settings the table depends on (rates, projector, λ, CTC weight, LLM, steps, learning
rate); a (seed, modality) may come from one run only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..reports.seed_report import write_seed_report
from .merge_sinks import SETTINGS, TRAINING, MergeCheck


def run_results(run: Path) -> list[dict]:
    """The per-seed results of a run's ``results.json`` (each must name its seed)."""
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no results.json; pass the --output_dir of a finished training run")
    saved = json.loads(path.read_text())
    results = saved["runs"] if isinstance(saved, dict) and "runs" in saved else saved
    if not isinstance(results, list) or any("seed" not in r for r in results):
        raise ValueError(f"{path}: not a training run's results with a seed per run (--eval_only, an experiment?)")
    return results


def _corpus(run: Path) -> dict | None:
    """The embedded corpus's stamp (fingerprint and config) of a run, None for LRS3."""
    stamp = run / "corpus" / "corpus.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def merge(runs: list[Path]) -> list[dict]:
    """Every run's per-seed results, in the order given; raises on a (seed, modality) that two runs both have, on
    runs of different corpora, and on a modality whose settings differ between runs."""
    merged: list[dict] = []
    check = MergeCheck()
    corpora = {str(run): (_corpus(run) or {}).get("fingerprint") for run in runs}
    if len(set(corpora.values())) > 1:
        raise ValueError(f"the runs were trained and tested on different corpora (fingerprints {corpora})")
    for run in runs:
        for result in run_results(run):
            check.claim(result["seed"], result["modality"], run)
            found = {k: result.get(k) for k in SETTINGS} | {k: result["training"].get(k) for k in TRAINING}
            check.same_settings(result["modality"], found, run)
            merged.append(result)
    return merged


def main(argv: list[str] | None = None) -> str:
    """Merge the runs and write the report; returns its Markdown (``results.md``)."""
    p = argparse.ArgumentParser(
        prog="python -m recipes.avsr.experiments.merge_seeds", description=__doc__.splitlines()[0]
    )
    p.add_argument("runs", nargs="+", type=Path, help="output dirs of finished training runs")
    p.add_argument("--output", type=Path, required=True, help="where results.json and results.md go")
    args = p.parse_args(argv)
    runs = merge(args.runs)
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    corpus = _corpus(args.runs[0])
    report = write_seed_report(args.output, seeds, corpus["config"]["seed"] if corpus else None, runs)
    print(report, end="")
    return report


if __name__ == "__main__":
    main()
