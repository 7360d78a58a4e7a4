"""Fixtures of the documentation tests: the tiny stand-ins of the Hub models the pages load, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.snippets import make_stand_ins


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> Path:
    """A folder holding a random-init stand-in for every Hub id the pages name (``google/vit-...``, ...)."""
    return make_stand_ins(tmp_path_factory.mktemp("stand_ins"))
