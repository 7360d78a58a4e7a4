"""The MkDocs hook that turns ``<!-- options: ... -->`` / ``<!-- cli: ... -->`` markers into tables of options."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from peft_gnnmoe import GNNMoEConfig, SinkDecorrelationConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [GNNMoEConfig, SinkDecorrelationConfig]


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("docs_options_hook", ROOT / "docs/hooks/options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(table: str) -> dict[str, tuple[str, str]]:
    """``{option: (default cell, meaning cell)}`` of a generated table."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def _help_fields(cls) -> list[dataclasses.Field]:
    declared = cls.__dict__["__annotations__"]
    return [f for f in dataclasses.fields(cls) if f.name in declared and f.metadata.get("help")]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_with_help_is_a_row_with_its_default_and_help(hook, cls):
    rows = _rows(hook.options_table(cls))
    fields = _help_fields(cls)
    assert [f.name for f in fields] == list(rows)
    for field in fields:
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = f"{type(default).__name__}()" if dataclasses.is_dataclass(default) else repr(default)
        assert rows[field.name][0] == "`" + shown.replace("|", "\\|") + "`", field.name
        assert rows[field.name][1].replace("\\|", "|") == " ".join(field.metadata["help"].split()), field.name


def test_a_default_factory_is_shown_by_its_value(hook):
    cell = _rows(hook.options_table(GNNMoEConfig))["shared_router_groups"][0]
    assert cell == f"`{GNNMoEConfig().shared_router_groups!r}`" and "q_proj" in cell  # not "<function <lambda>>"


def test_a_default_config_is_shown_by_its_constructor_not_its_fields(hook):
    assert _rows(hook.options_table(SinkDecorrelationConfig))["base_config"][0] == "`LoraConfig()`"


def test_only_the_fields_the_class_declares_are_listed(hook):
    rows = _rows(hook.options_table(GNNMoEConfig))
    assert "target_modules" in rows  # a PeftConfig field GNNMoEConfig overrides
    assert "task_type" not in rows and "inference_mode" not in rows  # inherited unchanged


def test_the_marker_is_replaced_by_the_table(hook):
    page = "Intro.\n\n<!-- options: peft_gnnmoe.GNNMoEConfig -->\n\nOutro."
    rendered = hook.on_page_markdown(page, page=None, config=None, files=None)
    assert "<!--" not in rendered
    assert "| `num_experts` | `4` | Number of Kronecker adapter experts per adapted layer. |" in rendered
    assert rendered.startswith("Intro.") and rendered.endswith("Outro.")


def test_a_marker_naming_nothing_fails_the_build(hook):
    with pytest.raises(AttributeError):
        hook.render("<!-- options: peft_gnnmoe.NoSuchConfig -->")


def test_the_cli_marker_lists_every_option_of_the_subcommand(hook):
    from peft_gnnmoe.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "analyze" in a.choices)
    parser = subparsers.choices["analyze"]
    rendered = hook.render("<!-- cli: peft-gnnmoe analyze -->")
    rows = _rows(rendered)
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and "-h" not in a.option_strings]
    assert sorted(rows) == sorted(flags)
    assert rows["--output-dir"][0] == "required"


@pytest.mark.parametrize(
    ("page", "cls"), [("guides/gnnmoe.md", GNNMoEConfig), ("guides/sink-decorrelation.md", SinkDecorrelationConfig)]
)
def test_guides_generate_their_options_table_instead_of_copying_it(page, cls):
    text = (ROOT / "docs" / page).read_text()
    assert f"<!-- options: peft_gnnmoe.{cls.__name__} -->" in text
    assert not re.search(r"^\| `\w+` \|", text, flags=re.M), "an options row typed by hand"


def test_mkdocs_runs_the_hook_and_does_not_render_it():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert "docs/hooks/options.py" in config["hooks"]
    assert "hooks/" in config["exclude_docs"].split()
    assert config["docs_dir"] == "docs"
    assert config["theme"]["font"] is False  # no Google Fonts fetched at build time
