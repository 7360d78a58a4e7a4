"""Pretrained backbones converted offline into transformers folders, cached outside the repository."""

from .cache import cache_dir

__all__ = ["cache_dir"]
