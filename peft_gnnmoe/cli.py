"""Command-line entry point ``peft-gnnmoe``: a dispatcher over subcommands.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds an ``argparse`` sub-parser and
sets ``func`` (taking the parsed namespace, returning an exit code). To add one, append its module to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# modules that provide a subcommand (each has `register(subparsers)`)
SUBCOMMANDS = ("peft_gnnmoe.analysis.command",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-gnnmoe", description="GNN-MoE and sink decorrelation tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
