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

    This is what is added to ``outputs.loss`` when ``add_aux_loss_to_output=True``; with it off, add it yourself.
    """
    return _tuner(model).aux_loss()


def get_routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per router of the last forward pass: expert ``load`` (share of top-k assignments), routing ``entropy``,
    unweighted ``balance_loss`` and ``z_loss``, as plain Python numbers (ready for a logger)."""
    stats = {}
    for name, router in _tuner(model).active_routers().items():
        routing = router.last_routing
        if routing is None:
            continue
        stats[name] = {
            "load": routing.load.tolist(),
            "entropy": routing.entropy.item(),
            "balance_loss": routing.balance_loss.item(),
            "z_loss": routing.z_loss.item(),
        }
    return stats


def get_expert_assignments(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per router of the last forward pass: ``topk_index`` (LongTensor B x S x k, best expert first),
    ``num_prefix_tokens`` (special tokens before the patches) and ``grid`` ((rows, cols) of the patches or None)."""
    out = {}
    for name, router in _tuner(model).active_routers().items():
        routing = router.last_routing
        if routing is None:
            continue
        out[name] = {
            "topk_index": routing.topk_index.cpu(),
            "num_prefix_tokens": routing.layout.num_prefix,
            "grid": routing.layout.grid,
        }
    return out
