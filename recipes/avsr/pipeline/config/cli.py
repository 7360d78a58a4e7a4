"""The command line of an AVSR entry point, generated from the configuration groups.

:func:`build_parser` adds one argument group per configuration group (see :mod:`.fields`), the preset options and the
shared spellings' deprecated aliases (:func:`recipes.common.options.add_deprecated_spellings`); :func:`parse_args`
parses a command line, and :func:`parse_config` resolves it (:func:`.resolve.resolve_config`). ``--print`` prints the
resolved configuration as JSON and exits; ``--help`` lists the core options, ``--help_all`` every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from recipes.common.options import add_deprecated_spellings

from .fields import HELP_ALL, add_group, given_options
from .presets import preset_names
from .resolve import GROUPS, resolve_config
from .run import RunConfig

DESCRIPTION = "LLM-based ASR / VSR / AVSR with LoRA and optional sink decorrelation, in the Llama-AVSR style."
MOVED_EXPERIMENTS = ("sinks", "decor_sweep")  # the training entry point's former --experiment values


@dataclass(frozen=True)
class Entry:
    """An entry point: its program name, its own option groups (title -> dataclass) and the defaults it sets."""

    prog: str = "recipes.avsr"
    description: str = DESCRIPTION
    experiment: str = "none"
    groups: dict[str, type] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    extra_spellings: dict[str, str] = field(default_factory=lambda: {"--lora_preset": "--preset"})


TRAINING = Entry()


def build_parser(entry: Entry = TRAINING, show_all: bool = False, suppress_defaults: bool = False):
    """The argument parser of ``entry``: the run's groups, then the entry's own groups."""
    p = argparse.ArgumentParser(
        prog=entry.prog, description=entry.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(HELP_ALL, action="store_true", help="show every option, also the advanced ones, and exit")
    presets = p.add_argument_group("presets", "option values from recipes/avsr/presets/*.json; a flag always wins")
    presets.add_argument(
        "--preset",
        nargs="+",
        choices=preset_names(),
        default=argparse.SUPPRESS if suppress_defaults else None,
        help="apply these presets in order (embedded applies by itself without --data_dir)",
    )
    presets.add_argument("--real", action="store_true", help="the real preset: Whisper tiny.en + SmolLM2-135M")
    presets.add_argument("--print", action="store_true", help="print the resolved configuration as JSON and exit")
    if suppress_defaults:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    add_group(p, RunConfig, "run", show_all, suppress_defaults)
    for name, group in {**GROUPS, **entry.groups}.items():
        add_group(p, group, name, show_all, suppress_defaults)
    if entry.experiment == "none":
        p.add_argument("--experiment", choices=MOVED_EXPERIMENTS, help=argparse.SUPPRESS)
    add_deprecated_spellings(p)
    add_deprecated_spellings(p, entry.extra_spellings)
    return p


def parse_args(argv: list[str] | None = None, entry: Entry = TRAINING) -> argparse.Namespace:
    """Parse ``argv``; the namespace also holds ``given``, the destinations the command line set explicitly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(entry)
    if HELP_ALL in argv:
        build_parser(entry, show_all=True).print_help()
        raise SystemExit(0)
    args = parser.parse_args(argv)
    if getattr(args, "experiment", None):
        parser.error(
            f"--experiment {args.experiment} is an entry point of its own now: run python -m "
            f"recipes.avsr.experiments.{args.experiment} (same options, without --experiment)"
        )
    args.given = frozenset(given_options(lambda **kw: build_parser(entry, **kw), argv))
    if entry.experiment != "none" and "modalities" in args.given and len(args.modalities) > 1:
        parser.error(
            f"the {entry.experiment} experiment analyses one modality, got --modality {' '.join(args.modalities)}: "
            "run it once per modality"
        )
    return args


def resolve_args(args: argparse.Namespace, entry: Entry = TRAINING) -> RunConfig:
    """The run configuration of parsed arguments (``args`` is left as it is)."""
    return resolve_config(vars(args), set(args.given), entry.experiment, entry.defaults)


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """The resolved run configuration of the training entry point's ``argv`` (``--print``: printed, then exit)."""
    args = parse_args(argv)
    config = resolve_args(args)
    if args.print:
        print(config_json(config))
        raise SystemExit(0)
    return config


def config_json(config) -> str:
    """A configuration (a dataclass, or a dict of them) as indented JSON."""
    if isinstance(config, dict):
        return json.dumps({k: dataclasses.asdict(v) for k, v in config.items()}, indent=1, default=str)
    return json.dumps(dataclasses.asdict(config), indent=1, default=str)
