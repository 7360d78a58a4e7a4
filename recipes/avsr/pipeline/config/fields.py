"""Options generated from dataclass fields: one field, one ``--name`` option, its help in ``metadata["help"]``.

A group is a frozen dataclass whose fields carry ``metadata={"help": ..., **argparse keywords}`` (made with
:func:`option`). ``metadata["flag"]`` renames the option, ``metadata["advanced"]`` keeps it out of ``--help`` (shown by
``--help_all``). The parser's defaults are the fields' defaults; which options the command line *gave* is read with a
second parse whose defaults are all suppressed (:func:`given_options`), so a preset never overrides a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from typing import Any

HELP_ALL = "--help_all"


def option(default: Any = None, help: str = "", advanced: bool = False, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option (``argparse_kwargs``: ``type``, ``nargs``, ...)."""
    metadata = {"help": help, "advanced": advanced, **argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default: a field's default is shared by every instance")
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(group: type) -> list[dataclasses.Field]:
    """The fields of ``group`` that are command-line options (those with ``metadata["help"]``)."""
    return [f for f in dataclasses.fields(group) if "help" in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
    """The option string of a field: ``metadata["flag"]`` or ``--<name>``."""
    return field.metadata.get("flag", f"--{field.name}")


def _argparse_kwargs(field: dataclasses.Field) -> dict[str, Any]:
    kwargs = {k: v for k, v in field.metadata.items() if k not in ("help", "advanced", "flag")}
    if "type" not in kwargs and kwargs.get("action") is None:
        if isinstance(field.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(field.default, (int, float, str)):
            kwargs["type"] = type(field.default)
    return kwargs


def add_group(
    parser: argparse.ArgumentParser, group: type, title: str, show_all: bool, suppress_defaults: bool = False
) -> None:
    """Add the options of ``group`` to ``parser`` as one argument group (advanced ones hidden unless ``show_all``)."""
    summary = " ".join((group.__doc__ or "").strip().split("\n\n")[0].split())  # the docstring's first paragraph
    arguments = parser.add_argument_group(title, summary)
    for field in option_fields(group):
        kwargs = _argparse_kwargs(field)
        hidden = field.metadata["advanced"] and not show_all
        default = field.default if isinstance(field.default, (str, int, float, bool, type(None))) else None
        if isinstance(field.default, tuple):
            default = list(field.default)
        arguments.add_argument(
            flag_of(field),
            dest=field.name,
            default=argparse.SUPPRESS if suppress_defaults else default,
            help=argparse.SUPPRESS if hidden else field.metadata["help"],
            **kwargs,
        )


def given_options(build_parser, argv: list[str]) -> set[str]:
    """The destinations ``argv`` sets explicitly (``build_parser(suppress_defaults=True)`` parses it once more)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated spellings warned in the first parse
        return set(vars(build_parser(suppress_defaults=True).parse_args(argv)))


def group_values(group: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of ``group``, lists made tuples (the groups are frozen)."""
    names = {f.name for f in dataclasses.fields(group)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}


def count_help_options(help_text: str) -> int:
    """How many option lines (``--name ...``) a ``--help`` text lists."""
    return sum(1 for line in help_text.splitlines() if line.lstrip().startswith("--"))
