"""The examples in the public docstrings (what the API reference pages and ``help()`` show) run as written.

The objects are the ones the reference pages render (their ``::: name`` lines), their public methods, and the
``peft_gnnmoe.analysis`` package. An example is the ``>>>`` / ``...`` lines of a docstring, run in a new namespace.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = re.compile(r"^\s*(>>>|\.\.\.) ?(.*)$")


# names are resolved as the docs build resolves them: the options hook's import_object
_spec = importlib.util.spec_from_file_location("docs_options_hook", ROOT / "docs" / "hooks" / "options.py")
_hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hook)


def _documented_objects() -> dict[str, object]:
    names = ["peft_gnnmoe.analysis"]
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        names += re.findall(r"^::: (\S+)", page.read_text(), flags=re.M)
    objects = {}
    for name in names:
        obj = _hook.import_object(name)
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
