"""Shared fixtures of the AVSR recipe tests: the small command line, and its corpus and stand-in models built once.

An end-to-end run on the embedded default first synthesises its corpus and pretrains its stand-in encoders and LLM
(``<output_dir>/corpus`` and ``<output_dir>/base_models``), and reuses both when they are already there. The corpus
build is reproducible (``test_reproducible.py``), so every run of the small command line would build the same ones:
``prepare_run`` copies a session's build into a test's own folder instead. ``test_recipe.py``'s first end-to-end
test still builds both from nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# the small command line of the recipe tests: a 24 + 4 utterance corpus, 3 pretraining steps, small batches, short
# decodes
SMALL = (
    "--corpus_train", "24", "--corpus_test", "4", "--encoder_pretrain_steps", "3", "--text_pretrain_steps", "3",
    "--max_batch_size", "4", "--eval_batch_size", "4", "--num_beams", "2", "--max_new_tokens", "8",
)  # fmt: skip

PARTS = ("corpus", "base_models")


@pytest.fixture(scope="session")
def small() -> Callable[..., list[str]]:
    """``small(*more)``: a new list, the small command line followed by ``more``."""

    def args(*more: str) -> list[str]:
        return [*SMALL, *more]

    return args


@pytest.fixture(scope="session")
def small_assets(tmp_path_factory) -> Path:
    """A folder holding ``corpus/`` and ``base_models/`` as a run of :data:`SMALL` builds them (once a session, or
    once per pytest-xdist worker). Tests copy them (``prepare_run``) and never write here."""
    from recipes.avsr.pipeline.config.cli import parse_config
    from recipes.avsr.pipeline.main import run_entry

    root = tmp_path_factory.mktemp("avsr_small_assets")
    run_entry(parse_config([*SMALL, "--output_dir", str(root)]), lambda *_: None)  # the data step of every run
    assert all((root / part).is_dir() for part in PARTS)
    return root


@pytest.fixture(scope="session")
def prepare_run(small_assets: Path) -> Callable[..., Path]:
    """``prepare_run(out, parts=("corpus", "base_models"))``: the folder ``out`` holding a copy of the session's small
    corpus and stand-ins (or of ``parts`` of them), for a run of :data:`SMALL` to reuse; returns ``out``."""

    def prepare(out: Path, parts: tuple[str, ...] = PARTS) -> Path:
        for part in parts:
            shutil.copytree(small_assets / part, out / part)
        return out

    return prepare
