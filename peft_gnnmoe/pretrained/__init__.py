"""Pretrained backbones converted offline into transformers folders, cached outside the repository."""

from .cache import cache_dir

_DINOV2 = {"convert_dinov2_onnx", "dinov2_vits14_path", "resolve_pretrained"}

__all__ = ["cache_dir", *sorted(_DINOV2)]


def __getattr__(name: str):
    # Imported lazily, so ``python -m peft_gnnmoe.pretrained.dinov2_onnx`` does not import the module twice.
    if name in _DINOV2:
        from . import dinov2_onnx

        return getattr(dinov2_onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
