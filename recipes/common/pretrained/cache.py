"""Where converted pretrained weights live: a cache folder outside the repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
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


def _marker_matches(folder: Path, marker: str, weights: str, source_hash: str) -> bool:
    path = folder / marker
    if not path.is_file() or not (folder / weights).is_file():
        return False
    try:
        return json.loads(path.read_text()).get("source_sha256") == source_hash
    except (OSError, ValueError):
        return False


def convert_once(
    target: Path,
    source: Path,
    source_hash: str,
    convert: Callable[[Path], object],
    marker: str,
    weights: str = "model.safetensors",
) -> Path:
    """``target``, made by ``convert(folder)`` on first use and reused while ``source_hash`` is unchanged.

    The conversion writes into a temporary sibling folder that is renamed into place only when complete, with a
    marker file (``marker``: source path, its SHA-256, seconds taken). A stale or partial ``target`` is replaced; a
    complete copy that another process (e.g. a second rank) renamed into place meanwhile is kept.
    """
    if _marker_matches(target, marker, weights, source_hash):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        convert(staging)
        record = {"source": str(source), "source_sha256": source_hash, "seconds": time.perf_counter() - start}
        (staging / marker).write_text(json.dumps(record, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the final folder is an ordinary cache folder
        if _marker_matches(target, marker, weights, source_hash):  # another process finished first: keep its copy
            shutil.rmtree(staging)
            return target
        if target.exists():  # stale or partial: replace it
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not _marker_matches(target, marker, weights, source_hash):
                raise
            shutil.rmtree(staging)  # lost the race to another process between the check and the rename
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
