"""Resuming a sweep: ``args.json``'s protocol record, the check a resumed sweep passes, and each run's checkpoint.

``args.json`` keeps ``{"protocol": ..., "args": ...}``: the protocol fields of the run configuration
(``DGRunConfig.protocol``, plus the image list's fingerprint for folder data sets) and, for the record, every field.
A resumed sweep, or a ``--shard`` worker joining it, must have the same protocol. Files written before the options
were renamed (``steps``) are read with their keys mapped to today's names (``config.LEGACY_NAMES``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..common.checkpoints import resolve_resume
from .config import LEGACY_NAMES


def read_protocol(path: str | os.PathLike) -> dict[str, Any]:
    """The protocol record of an args.json file, with old key names mapped to today's."""
    with open(path) as f:
        saved = json.load(f)["protocol"]
    return {LEGACY_NAMES.get(k, k): v for k, v in saved.items()}


def protocol_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, now)}`` for every protocol value that differs. Values are compared as JSON keeps them;
    ``images`` only when the saved sweep recorded it (sweeps started before it was recorded did not)."""
    now = json.loads(json.dumps(now))
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and (k != "images" or k in saved)}


def check_resumable(output_dir: str, protocol: dict[str, Any], resuming: bool) -> None:
    """Raises unless a sweep with ``protocol`` may write to ``output_dir``: a new folder, or the same protocol when
    ``resuming`` (``--resume_from_checkpoint`` or ``--shard``)."""
    path = os.path.join(output_dir, "args.json")
    if not os.path.exists(path):
        return
    if not resuming:
        raise FileExistsError(
            f"{output_dir} already holds a sweep; pass --resume_from_checkpoint to continue it or choose "
            "another --output_dir."
        )
    diff = protocol_differences(read_protocol(path), protocol)
    if diff:
        raise ValueError(
            f"Cannot resume {output_dir}: these arguments differ (saved, now): {diff}."
            + (
                " 'images': the data folder's readable images changed since the sweep started (files "
                "added, removed, repaired or skipped), so its splits would differ; start a new sweep."
                if "images" in diff
                else ""
            )
        )


def write_args_json(output_dir: str, protocol: dict[str, Any], args: dict[str, Any]) -> None:
    """Writes ``<output_dir>/args.json``."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump({"protocol": protocol, "args": args}, f, indent=2)


def resume_point(run_dir: str | os.PathLike, want: str | None) -> Path | None:
    """The checkpoint one run of the sweep resumes from (``--resume_from_checkpoint`` is ``want``).

    A folder applies to the run that owns it (``<run_dir>/checkpoints/step_<N>``); every other run of the sweep
    resumes from its own latest checkpoint, as with ``"latest"``.
    """
    if want and want != "latest" and Path(want).resolve().parent.parent != Path(run_dir).resolve():
        want = "latest"
    return resolve_resume(run_dir, want)
