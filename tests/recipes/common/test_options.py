"""The shared option vocabulary: old spellings are hidden aliases that parse like the new option and warn."""

from __future__ import annotations

import argparse
import warnings

import pytest

from recipes.common.options import DEPRECATED_SPELLINGS, SHARED_OPTIONS, add_deprecated_spellings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipe")
    p.add_argument("--max_steps", type=int)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--checkpointing_steps", type=int, default=0)
    p.add_argument("--resume_from_checkpoint", nargs="?", const="latest")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return p


OLD_AND_NEW = [
    (["--steps", "7"], ["--max_steps", "7"]),
    (["--grad_accum", "4"], ["--gradient_accumulation_steps", "4"]),
    (["--save_every", "50"], ["--checkpointing_steps", "50"]),
    (["--resume"], ["--resume_from_checkpoint"]),
    (["--resume", "run/checkpoint_3"], ["--resume_from_checkpoint", "run/checkpoint_3"]),
    (["--trial_seeds", "5", "6"], ["--seeds", "5", "6"]),
]


@pytest.mark.parametrize(("old", "new"), OLD_AND_NEW, ids=[" ".join(o) for o, _ in OLD_AND_NEW])
def test_an_old_spelling_parses_as_the_new_one_and_warns_naming_it(old, new):
    p = _parser()
    add_deprecated_spellings(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = p.parse_args(new)  # the new spelling does not warn
    with pytest.warns(FutureWarning, match=rf"{old[0]} is deprecated .* use {DEPRECATED_SPELLINGS[old[0]]}") as caught:
        got = p.parse_args(old)
    assert caught[0].filename == __file__  # the warning points at the code that parsed, not into argparse
    assert got == expected
    assert got != p.parse_args([])  # the value did arrive


def test_old_spellings_are_hidden_and_added_only_for_options_the_parser_has():
    p = argparse.ArgumentParser()
    p.add_argument("--max_steps", type=int)
    assert add_deprecated_spellings(p) == ["--steps"]
    assert "--steps" not in p.format_help()
    assert p.parse_args([]).max_steps is None  # the alias's default does not overwrite the option's


def test_every_old_spelling_maps_to_a_shared_option():
    assert set(DEPRECATED_SPELLINGS.values()) <= set(SHARED_OPTIONS)
    assert not set(DEPRECATED_SPELLINGS) & set(SHARED_OPTIONS)
