"""The shared option vocabulary: old spellings are hidden aliases that parse like the new option and warn."""

from __future__ import annotations

import argparse
import warnings

import pytest

from recipes.common.options import DEPRECATED_SPELLINGS, SHARED_OPTIONS, add_deprecated_spellings, mixed_precision


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


def test_the_precision_is_the_flag_else_the_launchers_else_none(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert mixed_precision(None) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")  # as `accelerate launch --mixed_precision` sets it
    assert mixed_precision(None) == "bf16"
    assert mixed_precision("fp16") == "fp16"


def test_a_recipe_refuses_the_precision_an_earlier_accelerator_left(monkeypatch, tmp_path):
    """accelerate's state is one per process: a plain ``Accelerator()`` after a bf16 one (a TRL SFTTrainer's default
    on CPUs) would run in bf16. The recipes' Accelerator asks for its precision, so accelerate refuses instead."""
    from accelerate import Accelerator

    from recipes.avsr.pipeline.config.train import TrainConfig
    from recipes.avsr.pipeline.training import make_accelerator
    from recipes.dg import train

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    assert Accelerator(cpu=True).mixed_precision == "bf16"  # what the recipes did before: a setting quietly lost
    with pytest.raises(ValueError, match="already been initialized"):
        make_accelerator(TrainConfig())
    with pytest.raises(ValueError, match="already been initialized"):  # the Accelerator comes before any data
        train.main(["--output_dir", str(tmp_path / "dg"), "--report_to", "none", "--jobs", "1"])
    assert make_accelerator(TrainConfig(mixed_precision="bf16")).mixed_precision == "bf16"
