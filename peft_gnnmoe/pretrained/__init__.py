"""Pretrained backbones converted offline into transformers folders, cached outside the repository."""

from .cache import cache_dir
from .dinov2_onnx import PRESET_NAME as DINOV2_PRESET_NAME
from .dinov2_onnx import convert_dinov2_onnx, dinov2_vits14_path, resolve_pretrained

__all__ = ["DINOV2_PRESET_NAME", "cache_dir", "convert_dinov2_onnx", "dinov2_vits14_path", "resolve_pretrained"]
