"""Run the Python blocks of Markdown pages, offline, against tiny stand-ins of the Hub models they name.

Every fenced block tagged ``python`` in a page is usage and runs: the blocks of one page in order, in one shared
namespace, with the working directory set to a work folder. Where a page loads a Hub id
(``ViTForImageClassification.from_pretrained("google/vit-base-patch16-224-in21k")``), the work folder holds a tiny
random-init model of the same architecture saved under a folder of exactly that name, so the call really loads it
through transformers' local-folder path; nothing is mocked and nothing is downloaded.

Also a script, for an installed wheel (it imports nothing from the clone: only the standard library, torch,
transformers, tokenizers and, through the pages, peft_gnnmoe and peft)::

    python tests/docs/snippets.py --workdir DIR README.md docs/getting-started.md

builds the stand-ins in ``DIR`` (once), runs every page's blocks there and exits with 1 when a block fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only local folders; read by huggingface_hub at import
os.environ.setdefault("MPLBACKEND", "Agg")

# A fence opens with ``` and an info string, possibly indented (inside an admonition or a list item).
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)[^\n`]*$")

RUN_LANGUAGE = "python"
# what a block may be tagged with: python runs; the rest is shell, output or data and never runs
ALLOWED_LANGUAGES = frozenset({"python", "bash", "text", "yaml", "json", "toml"})

# Hub ids that pages load, and what stands in for them (see make_stand_ins)
VIT_ID = "google/vit-base-patch16-224-in21k"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DINOV2_ID = "facebook/dinov2-small"
STAND_IN_IDS = (VIT_ID, SMOLLM2_ID, DINOV2_ID)
PHOTO = "photo.jpg"  # stands in for the reader's own photo

# the stand-in tokenizer's words (any other word maps to the unknown token, as a real tokenizer's rare pieces would)
_WORDS = (
    "the quick brown fox jumps over lazy dog . , ! ? : ; ' Paris is capital of France and Berlin Germany a an "
    "to in on at it this that was he she they we you I cat sat mat sun rises east river flows sea birds sing "
    "morning Transcribe speech text video audio hello world one two three four five six seven eight nine ten"
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(path: str | os.PathLike) -> list[Block]:
    """Every fenced block of the Markdown file ``path`` (tilde or backtick fences, indented ones dedented)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the code block opened here is never closed.")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
        blocks.append(Block(path, i + 1, opening["info"].lower(), "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def python_blocks(path: str | os.PathLike) -> list[Block]:
    """The blocks of ``path`` that run: those tagged ``python``."""
    return [block for block in code_blocks(path) if block.language == RUN_LANGUAGE]


# ---- stand-ins ------------------------------------------------------------------------------------------------------


def _save_vit(folder: Path) -> None:
    """ViT-B/16-in21k's architecture at toy size: a ViTModel checkpoint (no head, like the in21k weights)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def _save_smollm2(folder: Path) -> None:
    """SmolLM2-135M-Instruct's shape of model and tokenizer at toy width: a Llama with its 30 layers, its special
    tokens (``<|endoftext|>`` 0, ``<|im_start|>`` 1 = BOS, ``<|im_end|>`` 2 = EOS and padding) and, like it, a
    tokenizer that adds no BOS by itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted({v for w in _WORDS.split() for v in (w, w.lower(), w.capitalize())})
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=64 * ((len(vocab) + 63) // 64),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def _save_dinov2(folder: Path) -> None:
    """DINOv2 ViT-S/14's architecture at toy size (CLS + a 4x4 patch grid), with its image processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(folder)


def _save_photo(path: Path) -> None:
    """A 320 x 240 RGB picture (colour gradients), for the pages' ``Image.open("photo.jpg")``."""
    import numpy as np
    from PIL import Image

    rows, cols = np.mgrid[0:240, 0:320]
    pixels = np.stack([rows * 255 // 239, cols * 255 // 319, (rows + cols) * 255 // 558], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


_BUILDERS = {VIT_ID: _save_vit, SMOLLM2_ID: _save_smollm2, DINOV2_ID: _save_dinov2}


def make_stand_ins(workdir: str | os.PathLike) -> Path:
    """Save a tiny random-init stand-in for every Hub id the pages load into ``workdir/<hub id>/``, and the photo
    ``workdir/photo.jpg`` (skipping what is already there); return ``workdir``."""
    import torch

    workdir = Path(workdir)
    for hub_id, build in _BUILDERS.items():
        folder = workdir / hub_id
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(0)
        build(folder)
    if not (workdir / PHOTO).is_file():
        _save_photo(workdir / PHOTO)
    return workdir


def link_stand_ins(stand_ins: str | os.PathLike, workdir: str | os.PathLike) -> None:
    """Make what ``make_stand_ins`` built in ``stand_ins`` visible in ``workdir``, under the same names (symlinks)."""
    stand_ins, workdir = Path(stand_ins).resolve(), Path(workdir)
    for entry in sorted(stand_ins.iterdir()):
        target = workdir / entry.name
        if not target.exists():
            target.symlink_to(entry, target_is_directory=entry.is_dir())


# ---- running --------------------------------------------------------------------------------------------------------


class SnippetError(AssertionError):
    """A block of a page raised; the message names the page, the block's line and the traceback."""


@contextlib.contextmanager
def working_directory(path: str | os.PathLike) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_page(page: str | os.PathLike, workdir: str | os.PathLike) -> int:
    """Run the ``python`` blocks of ``page`` in order in one namespace, in ``workdir``; return how many ran.

    Raises SnippetError (naming the block) on the first block that fails.
    """
    import torch

    blocks = python_blocks(Path(page).resolve())
    namespace: dict = {"__name__": "__main__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stand-ins are tiny: more threads only wait on each other on a busy machine
    try:
        with working_directory(workdir):
            for block in blocks:
                try:
                    exec(compile(block.code, block.name, "exec"), namespace)
                except Exception as exc:
                    details = "".join(traceback.format_exception(exc))
                    raise SnippetError(f"the block at {block.name} failed:\n{block.code}\n{details}") from exc
    finally:
        torch.set_num_threads(threads)
    return len(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="+", help="Markdown files whose python blocks run")
    parser.add_argument("--workdir", required=True, help="work folder: the stand-ins go here, blocks run here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    make_stand_ins(workdir)
    failed = 0
    for page in args.pages:
        try:
            count = run_page(page, workdir)
        except SnippetError as exc:
            print(f"FAILED {page}\n{exc}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok {page}: {count} python blocks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
