"""One table from the runs of several DG output folders, with paired differences against the first.

Options that apply to a whole invocation (``--graph``, ``--prefix_tokens``, ``--image_size``, ...) put their runs in
separate output folders; this puts them side by side under labels, pairs each with the first label's runs of the same
(held-out domain, trial seed), and writes ``compare.json``, ``compare.md`` and ``chart.png`` to ``--output``:

    python -m recipes.dg.compare knn+grid=runs/dg-real:gnnmoe-gcn radius=runs/dg-real-graph/radius \\
        lora=runs/dg-real:lora --output runs/dg-real-graph/compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .paired import markdown_paired, paired_differences
from .report import aggregate, markdown_table, plot_chart


def load_runs(spec: str) -> tuple[str, list[dict]]:
    """``LABEL=FOLDER[:METHOD]`` -> (label, the finished runs of METHOD in FOLDER, relabelled). METHOD may be left out
    when the folder holds one method."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"{spec!r}: give runs as LABEL=FOLDER or LABEL=FOLDER:METHOD")
    folder, _, method = rest.partition(":")
    runs_dir = Path(folder) / "runs"
    methods = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    if not method:
        if len(methods) != 1:
            raise ValueError(f"{spec!r}: {runs_dir} holds methods {methods}; name one as {label}={folder}:METHOD")
        method = methods[0]
    if method not in methods:
        raise ValueError(f"{spec!r}: no runs of {method!r} in {runs_dir} (it holds {methods})")
    results = []
    for path in sorted((runs_dir / method).glob("*/result.json")):
        result = json.loads(path.read_text())
        results.append(result | {"method": label, "source": str(path.parent)})
    if not results:
        raise ValueError(f"{spec!r}: {runs_dir / method} has no finished run (no */result.json)")
    return label, results


def compare(specs: list[str], output: Path) -> dict:
    """The table of every label and the paired differences of every other label minus the first."""
    labels, results = [], []
    for spec in specs:
        label, runs = load_runs(spec)
        if label in labels:
            raise ValueError(f"label {label!r} is given twice")
        labels.append(label)
        results += runs
    domains_by_env = {r["test_env"]: r["test_domain"] for r in results}
    domains = [domains_by_env.get(e, f"env{e}") for e in range(max(domains_by_env) + 1)]
    reference = labels[0]
    paired = paired_differences(results, [reference], references=labels[1:])  # every other label minus the first
    table = aggregate(results, domains, labels) | {"paired": paired, "reference": reference}
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.json").write_text(json.dumps(table, indent=2))
    text = f"{markdown_table(table)}\n\nPaired differences against {reference}, test accuracy:\n\n"
    (output / "compare.md").write_text(text + markdown_paired(paired) + "\n")
    plot_chart(str(output / "chart.png"), table)
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=FOLDER[:METHOD]; the first is the reference of the differences")
    p.add_argument("--output", type=Path, required=True, help="folder for compare.json, compare.md and chart.png")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two LABEL=FOLDER[:METHOD] to compare")
    table = compare(args.runs, args.output)
    print((args.output / "compare.md").read_text())
    return table


if __name__ == "__main__":
    main()
