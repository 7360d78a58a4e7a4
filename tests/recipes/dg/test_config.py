"""The DG recipe's run configuration: frozen, fully resolved, one spelling per shared option."""

import argparse
import dataclasses
import warnings

import pytest

from recipes.dg import config, train

# DG's spellings before recipes/common/options.py, and what each became
OLD_SPELLINGS = [
    (["--steps", "7"], ["--max_steps", "7"], "--max_steps"),
    (["--trial_seeds", "3", "4"], ["--seeds", "3", "4"], "--seeds"),
]


@pytest.mark.parametrize(("old", "new", "name"), OLD_SPELLINGS)
def test_an_old_spelling_parses_to_the_same_config(old, new, name):
    with pytest.warns(FutureWarning):
        got = train.parse_args(old)
    assert got == train.parse_args(new)


@pytest.mark.parametrize(("old", "new", "name"), OLD_SPELLINGS)
def test_an_old_spelling_warns_naming_the_new_one(old, new, name):
    with pytest.warns(FutureWarning, match=f"{old[0]} is deprecated .*use {name}$"):
        train.parse_args(old)


@pytest.mark.parametrize(("old", "new", "name"), OLD_SPELLINGS)
def test_workers_get_the_new_spelling(old, new, name):
    with pytest.warns(FutureWarning):
        cfg = train.parse_args(old)
    assert cfg.execution.argv == new  # so that only the main process warns under --jobs


def test_workers_get_the_new_spelling_of_an_option_with_equals():
    with pytest.warns(FutureWarning):
        cfg = train.parse_args(["--steps=7", "--output_dir", "out"])
    assert cfg.execution.argv == ["--max_steps=7", "--output_dir", "out"]


def test_new_spellings_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.parse_args(["--max_steps", "7", "--seeds", "0"])


def test_the_old_spellings_are_hidden_from_help():
    text = train.build_parser().format_help()
    assert "--trial_seeds" not in text
    assert "--steps " not in text


def test_the_config_is_frozen():
    cfg = train.parse_args([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.max_steps = 5


def test_every_option_is_a_config_field():
    fields = {f.name for cls in config.GROUPS.values() for f in dataclasses.fields(cls)}
    dests = {a.dest for a in train.build_parser()._actions if a.dest != "help"}
    assert dests - {"argv"} <= fields


def test_field_names_are_unique_over_the_groups():
    names = [f.name for cls in config.GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_the_parser_and_the_dataclasses_agree_on_defaults():
    fields = {f.name: f for cls in config.GROUPS.values() for f in dataclasses.fields(cls)}
    for action in train.build_parser()._actions:
        if action.default in (None, argparse.SUPPRESS) or action.dest == "help":
            continue
        field = fields[action.dest]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert default == action.default, action.dest


def test_the_protocol_is_the_fields_marked_protocol():
    cfg = train.parse_args([])
    assert cfg.protocol()["max_steps"] == 200
    assert "seeds" not in cfg.protocol()  # more seeds extend a sweep; they do not change its runs
    assert "gradient_accumulation_steps" not in cfg.protocol()  # the same numbers, by design


@pytest.mark.parametrize("name", ["--max_steps", "--batch_size", "--eval_every", "--checkpointing_steps"])
def test_counts_below_one_are_refused_naming_the_option(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        train.parse_args([name, "0"])
