"""The README is the PyPI long description and the project's front page: short, absolute links, the two commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SITE = "https://peft-gnnmoe.readthedocs.io/"


def test_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_readme_keeps_the_two_set_up_commands():
    assert (
        "bash scripts/setup.sh && accelerate launch -m recipes.dg      "
        "# the main job: the embedded DG benchmark, offline (~7 min)\n"
    ) in README
    assert "bash scripts/setup.sh && python -m pytest -q tests            # the test suite\n" in README


def test_readme_links_are_absolute():
    """Relative links (``docs/...md``, images) break on PyPI."""
    targets = re.findall(r"\]\(([^)]+)\)", README) + re.findall(r"<(https?://[^>]+)>", README)
    assert targets
    relative = [t for t in targets if not t.startswith(("https://", "http://"))]
    assert not relative, relative


def test_readme_links_to_pages_that_exist():
    """Every link into the documentation site names a page of ``docs/`` (site_url + the page's directory URL)."""
    for url in re.findall(re.escape(SITE) + r"([^)>\s]*)", README):
        path = url.rstrip("/")
        candidates = (
            [ROOT / "docs" / f"{path}.md", ROOT / "docs" / path / "index.md"] if path else [ROOT / "docs/index.md"]
        )
        assert any(c.is_file() for c in candidates), url


def test_mkdocs_site_url_is_the_one_the_readme_links_to():
    assert f"site_url: {SITE}\n" in (ROOT / "mkdocs.yml").read_text()
