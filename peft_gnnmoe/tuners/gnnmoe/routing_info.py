"""Public read-outs of the routers after a forward pass: auxiliary loss, statistics, per-token expert choices."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import GNNMoEModel


def _tuner(model: nn.Module) -> GNNMoEModel:
    tuner = model if isinstance(model, GNNMoEModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, GNNMoEModel):
        raise TypeError(
            f"Expected a PeftModel (or GNNMoEModel) with GNN-MoE adapters, got {type(model).__name__}. "
            "Wrap the model with get_peft_model(model, GNNMoEConfig(...)) first."
        )
    return tuner


def get_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Weighted load-balancing + z-loss of the last forward pass, summed over routers (None before any forward).

    Every image's (sequence's) losses are computed over its own real tokens and weighted like the model weights its
    loss (``items_b / num_items_in_batch`` under Trainer, else by label count, else ``1 / B``), so the term is
    invariant to gradient accumulation and to the number of processes. This is what is added to ``outputs.loss``
    when ``add_aux_loss_to_output=True``; with it off, add it yourself.
    """
    return _tuner(model).aux_loss()


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float().mean() for v in values]).mean()


def get_routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per router, over every routing of the last forward pass and the real (unpadded) tokens: expert ``load``
    (share of top-k assignments), routing ``entropy``, unweighted ``balance_loss`` and ``z_loss`` (means over the
    sequences), as plain Python numbers (ready for a logger)."""
    stats = {}
    for name, router in _tuner(model).active_routers().items():
        routings = router.routings
        if not routings:
            continue
        stats[name] = {
            "load": torch.stack([r.load for r in routings]).mean(0).tolist(),
            "entropy": _mean([r.entropy for r in routings]).item(),
            "balance_loss": _mean([r.balance_loss for r in routings]).item(),
            "z_loss": _mean([r.z_loss for r in routings]).item(),
        }
    return stats


def get_expert_assignments(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per router, its last routing of the last forward pass: ``topk_index`` (LongTensor B x S x k, best expert
    first), ``num_prefix_tokens`` (special tokens before the patches), ``grid`` ((rows, cols) of the patches or None)
    and ``valid`` (BoolTensor B x S of the real tokens, or None when nothing was padded)."""
    out = {}
    for name, router in _tuner(model).active_routers().items():
        routing = router.last_routing
        if routing is None:
            continue
        out[name] = {
            "topk_index": routing.topk_index.cpu(),
            "num_prefix_tokens": routing.layout.num_prefix,
            "grid": routing.layout.grid,
            "valid": None if routing.valid is None else routing.valid.cpu(),
        }
    return out
