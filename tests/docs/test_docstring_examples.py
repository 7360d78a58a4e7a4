"""The examples in the public docstrings (what the API reference pages and ``help()`` show) run as written.

The objects are the ones the reference pages render (their ``::: name`` lines), their public methods, and the
``peft_gnnmoe.analysis`` package. An example is the ``>>>`` / ``...`` lines of a docstring, run in a new namespace.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = re.compile(r"^\s*(>>>|\.\.\.) ?(.*)$")


def _resolve(dotted: str):
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module_name), attribute)


def _documented_objects() -> dict[str, object]:
    names = ["peft_gnnmoe.analysis"]
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        names += re.findall(r"^::: (\S+)", page.read_text(), flags=re.M)
    objects = {}
    for name in names:
        obj = _resolve(name)
        objects[name] = obj
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if not member.startswith("_") and callable(value):
                    objects[f"{name}.{member}"] = value
    return objects


def _example(docstring: str | None) -> str:
    return "\n".join(m.group(2) for line in (docstring or "").splitlines() if (m := PROMPT.match(line)))


EXAMPLES = {name: code for name, obj in _documented_objects().items() if (code := _example(inspect.getdoc(obj)))}


def test_the_public_api_has_examples():
    assert {"peft_gnnmoe.GNNMoEConfig", "peft_gnnmoe.SinkDecorrelationConfig", "peft_gnnmoe.analysis"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example_runs(name):
    exec(compile(EXAMPLES[name], f"<example of {name}>", "exec"), {"__name__": "__example__"})
