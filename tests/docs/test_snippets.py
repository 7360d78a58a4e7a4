"""Every ``python`` block of the README and of the documentation pages runs, offline, in page order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.docs.snippets import (
    ALLOWED_LANGUAGES,
    SMOLLM2_ID,
    STAND_IN_IDS,
    SnippetError,
    code_blocks,
    link_stand_ins,
    python_blocks,
    run_page,
    working_directory,
)

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES_WITH_SNIPPETS = [page for page in PAGES if python_blocks(page)]


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS, ids=_id)
def test_page_snippets_run(page, stand_ins, tmp_path):
    link_stand_ins(stand_ins, tmp_path)
    assert run_page(page, tmp_path) == len(python_blocks(page))


def test_the_quickstarts_are_among_the_pages_that_run():
    ran = {_id(page) for page in PAGES_WITH_SNIPPETS}
    assert {"README.md", "docs/getting-started.md", "docs/guides/gnnmoe.md"} <= ran


def test_readme_has_a_quickstart_per_tuner():
    code = "\n".join(block.code for block in python_blocks(ROOT / "README.md"))
    assert "GNNMoEConfig(" in code and "SinkDecorrelationConfig(" in code


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_code_block_says_what_it_is(page):
    """Usage is ``python`` (and runs); shell commands, outputs and data are ``bash`` / ``text`` / ...; no block is
    left untagged or tagged with a Python dialect that would not run (``py``, ``pycon``)."""
    untagged = [block.name for block in code_blocks(page) if block.language not in ALLOWED_LANGUAGES]
    assert not untagged, f"code blocks without an allowed language tag: {untagged}"


def test_code_blocks_are_found_in_admonitions_and_tilde_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n!!! note\n    ```python\n    x = 1\n    ```\n\n~~~bash\nls\n~~~\n\n```python\ny = x\n```\n"
    )
    blocks = code_blocks(page)
    assert [(b.language, b.code, b.line) for b in blocks] == [
        ("python", "x = 1\n", 4),
        ("bash", "ls\n", 8),
        ("python", "y = x\n", 12),
    ]


def test_an_unclosed_block_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        code_blocks(page)


def test_blocks_of_a_page_share_one_namespace_and_run_in_the_workdir(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '```python\nopen("made.txt", "w").write("x")\nvalue = 2\n```\n\n```python\nassert value == 2\n```\n'
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert run_page(page, workdir) == 2
    assert (workdir / "made.txt").is_file()


def test_a_failing_block_is_reported_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```python\nraise RuntimeError('boom')\n```\n")
    with pytest.raises(SnippetError, match=r"(?s)page\.md:3.*boom"):
        run_page(page, tmp_path)


def test_stand_ins_load_through_their_hub_ids(stand_ins, tmp_path):
    link_stand_ins(stand_ins, tmp_path)
    with working_directory(tmp_path):
        assert AutoConfig.from_pretrained(STAND_IN_IDS[0]).model_type == "vit"
        tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_ID)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert tokenizer.bos_token_id == 1 and ids[0] != 1  # like SmolLM2's, it adds no BOS: the pages add it themselves
    assert tokenizer.unk_token_id not in ids  # the pages' words are in its vocabulary


def test_the_script_imports_nothing_from_the_clone():
    """It runs inside a wheel's venv: standard library, torch, transformers, tokenizers, numpy and PIL only."""
    allowed = {"torch", "transformers", "tokenizers", "numpy", "PIL", "__future__"} | set(sys.stdlib_module_names)
    tree = ast.parse((ROOT / "tests/docs/snippets.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= allowed, imported - allowed


def test_the_script_exits_non_zero_when_a_block_fails(stand_ins, tmp_path):
    good, bad = tmp_path / "good.md", tmp_path / "bad.md"
    good.write_text("```python\nimport os\nassert os.path.isdir('google/vit-base-patch16-224-in21k')\n```\n")
    bad.write_text("```python\nraise SystemError('boom')\n```\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/docs/snippets.py"), "--workdir", str(stand_ins), str(good), str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"ok {good}" in result.stdout
    assert f"FAILED {bad}" in result.stderr and "boom" in result.stderr
