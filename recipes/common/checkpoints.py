"""Atomic training checkpoints under ``<run_dir>/checkpoints/step_<N>``, a limit on how many are kept, and resumption.

A checkpoint is ``accelerator.save_state`` written into ``step_<N>.tmp`` and renamed to ``step_<N>`` once complete,
with the recipe's own counters in ``trainer_state.json``: a kill at any moment never leaves half a checkpoint under a
final name, and ``latest_checkpoint`` only ever returns complete ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete checkpoints (``checkpoints/step_<N>`` holding ``trainer_state.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = path.name[len("step_") :]
        if path.name.startswith("step_") and step.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator, run_dir: str | os.PathLike, step: int, state: dict[str, Any], limit: int | None = 1
) -> Path:
    """Save the training state of ``step`` atomically and keep ``limit`` checkpoints (None: all): this one and the
    newest others.

    Every process must call it (``save_state`` synchronises); only the main process writes the counters, renames
    and prunes.
    """
    final = Path(run_dir) / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.is_dir():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None and limit > 0:
            # the one just written always stays (a resumed run may find newer ones left by the run it resumes)
            others = [path for path in checkpoint_dirs(run_dir) if path != final]
            for old in others[: max(0, len(others) - (limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(run_dir: str | os.PathLike, want: str | None) -> Path | None:
    """The checkpoint to resume from: None for no resumption, ``"latest"`` for the run's newest complete checkpoint
    (None when there is none yet), otherwise the given folder, which must be a complete checkpoint."""
    if not want:
        return None
    if want == "latest":
        return latest_checkpoint(run_dir)
    path = Path(want).resolve()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{want} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoints/step_<N> folder or 'latest'."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """``accelerator.load_state`` from ``path``; returns the recipe counters saved with it."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
