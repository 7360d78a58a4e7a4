"""Where converted pretrained weights live: a cache folder outside the repository."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "PEFT_GNNMOE_CACHE"
DEFAULT_CACHE = Path("~/.cache/peft-gnnmoe")


def cache_root() -> Path:
    """The cache root: ``$PEFT_GNNMOE_CACHE`` when set (and not empty), else ``~/.cache/peft-gnnmoe``."""
    value = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(value).expanduser() if value else DEFAULT_CACHE.expanduser()


def cache_dir(*parts: str) -> Path:
    """Return ``cache_root() / parts...``, creating the folders. Nothing is ever written into the repository.

    Each part must be a plain relative name (no absolute paths, no ``..``), so a caller cannot escape the cache.
    """
    for part in parts:
        pure = Path(part)
        if not part or pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"cache_dir parts must be plain relative names without '..', got {part!r}")
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
