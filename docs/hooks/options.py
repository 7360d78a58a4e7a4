"""MkDocs hook: tables of options generated from the code, so that no option is described twice.

Two markers in a page are replaced at build time:

- ``<!-- options: peft_gnnmoe.GNNMoEConfig -->`` by a table (option, default, meaning) of the dataclass fields the
  class defines or overrides, with their ``metadata["help"]``: ``options_table``;
- ``<!-- cli: peft-gnnmoe analyze -->`` by a table of the subcommand's arguments, from its ``argparse`` parser:
  ``cli_table``.

A marker that names nothing importable fails the build.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from typing import Any

OPTIONS_MARKER = re.compile(r"<!--\s*options:\s*(?P<target>[\w.]+)\s*-->")
CLI_MARKER = re.compile(r"<!--\s*cli:\s*peft-gnnmoe\s+(?P<command>[\w-]+)\s*-->")


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and value == type(value)():
        text = f"{type(value).__name__}()"  # a default-constructed config (e.g. LoraConfig()), not its 40 fields
    return "`" + text.replace("|", "\\|") + "`"


def field_default(field: dataclasses.Field) -> Any:
    """The value a field takes when it is not given (a ``default_factory`` is called)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"field {field.name!r} has no default")


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields ``cls`` itself declares (new ones and overrides of its bases'), in declaration order."""
    declared = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in declared]


def options_table(cls: type) -> str:
    """A Markdown table (option, default, meaning) of the fields ``cls`` defines or overrides that have help text."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for field in own_fields(cls):
        help_text = field.metadata.get("help")
        if help_text:
            rows.append(f"| `{field.name}` | {_code(field_default(field))} | {_cell(help_text)} |")
    if len(rows) == 2:
        raise ValueError(f"{cls.__qualname__} declares no field with metadata['help']")
    return "\n".join(rows)


def import_object(dotted: str) -> Any:
    """``package.module.Name`` → the object (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {dotted!r}")


def _subcommand_parser(command: str) -> argparse.ArgumentParser:
    from peft_gnnmoe.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    raise ValueError(f"peft-gnnmoe has no subcommand {command!r}")


def cli_table(command: str) -> str:
    """A Markdown table (option, default, meaning) of the arguments of ``peft-gnnmoe COMMAND``."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for action in _subcommand_parser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}`"
        if action.required:
            default = "required"
        elif isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif action.default is None:
            default = "–"
        else:
            default = _code(action.default)
        meaning = action.help or ""
        if action.choices:
            meaning += f" (one of {', '.join(f'`{c}`' for c in action.choices)})"
        rows.append(f"| {name} | {default} | {_cell(meaning)} |")
    return "\n".join(rows)


def render(markdown: str) -> str:
    """``markdown`` with every options and cli marker replaced by its table."""
    markdown = OPTIONS_MARKER.sub(lambda m: options_table(import_object(m["target"])), markdown)
    return CLI_MARKER.sub(lambda m: cli_table(m["command"]), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown)
