"""Averaging the trainable weights of a run's last checkpoints (``--average_last N``), as Llama-AVSR does."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from recipes.common.checkpoints import checkpoint_dirs

from .weights import trainable_state_dict

CHECKPOINT_WEIGHTS = "trainable_0.safetensors"  # what pipeline.weights' save hook writes


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the trainable weights saved in ``paths`` (accumulated in float64, returned in each
    tensor's saved dtype); the checkpoints must hold the same keys and shapes."""
    from safetensors.torch import load_file

    if not paths:
        raise ValueError("no checkpoint to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        state = load_file(os.path.join(path, CHECKPOINT_WEIGHTS))
        if total and set(state) != set(total):
            raise RuntimeError(
                f"checkpoint {path} holds other weights than {paths[0]}: {sorted(set(state) ^ set(total))[:5]}"
            )
        for key, tensor in state.items():
            dtypes[key] = tensor.dtype
            total[key] = total.get(key, 0) + tensor.to(torch.float64)
    return {key: (t / len(paths)).to(dtypes[key]) for key, t in total.items()}


def load_average_of_last(model: torch.nn.Module, run_dir: str | os.PathLike, n: int) -> list[Path]:
    """Load the mean of the newest ``n`` complete checkpoints of ``run_dir`` into ``model``'s trainable weights and
    return the checkpoints used (a warning when fewer than ``n`` exist)."""
    paths = checkpoint_dirs(run_dir)[-n:]
    if len(paths) < n:
        warnings.warn(f"--average_last {n}: only {len(paths)} checkpoints in {run_dir}; averaging those", stacklevel=2)
    state = average_checkpoints(paths)
    expected = set(trainable_state_dict(model))
    if set(state) != expected:
        raise RuntimeError(
            f"the checkpoints do not match the model: differing keys {sorted(set(state) ^ expected)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return paths
