"""Attention-sink scores (Gu et al., "When Attention Sink Emerges"): the attention mass each key position receives.

For layer ``l``, head ``h`` and key position ``k`` of one sequence, ``alpha[l, h, k]`` is the mean over the valid
queries ``i >= k`` of ``A[l, h, i, k]``; a key is a sink when its score averaged over layers and heads exceeds
``threshold`` (0.3 by default; a uniform causal attention would give about ``1 / (T - k)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._inputs import Batch, as_batch, inference, to_list, valid_mask


@dataclass
class AttentionSinkReport:
    """Result of :func:`attention_sink_scores`; ``to_dict()`` is JSON-serialisable.

    ``scores[b][l][h][k]`` is ``alpha`` of sequence ``b`` (0 at padding), ``mean_scores[b][k]`` its mean over layers
    and heads, ``layer_scores[b][l][k]`` its mean over heads, and ``sinks`` lists the keys above ``threshold``.
    """

    threshold: float
    scores: list
    layer_scores: list
    mean_scores: list
    sinks: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention (the only one that returns attention weights), then back."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_sink_scores(model: nn.Module, batch: Batch, threshold: float = 0.3) -> AttentionSinkReport:
    """Attention mass received by every key position, per layer and head, for every sequence of ``batch``.

    The model is run once with eager attention and ``output_attentions=True`` (switched back afterwards).
    """
    batch = as_batch(batch)
    valid = valid_mask(batch)
    with inference(model) as base, eager_attention(base):
        outputs = base(**batch, output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError(f"{type(base).__name__} returned no attention weights; it needs eager attention support.")

    per_layer = []
    for attention in attentions:  # B, H, T, T (queries, keys)
        per_layer.append(_received_attention(attention.float(), valid.to(attention.device)))
    alpha = torch.stack(per_layer, dim=1)  # B, L, H, T
    layer_scores = alpha.mean(dim=2)  # B, L, T
    mean_scores = layer_scores.mean(dim=1)  # B, T
    sinks = [
        {"batch": b, "token": k, "score": round(mean_scores[b, k].item(), 4)}
        for b, k in (mean_scores > threshold).nonzero().tolist()
    ]
    return AttentionSinkReport(
        threshold=threshold,
        scores=to_list(alpha, 4),
        layer_scores=to_list(layer_scores, 4),
        mean_scores=to_list(mean_scores, 4),
        sinks=sinks,
    )


def _received_attention(attention: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``alpha[b, h, k]`` = mean over valid queries ``i >= k`` of ``attention[b, h, i, k]``; 0 at padded keys."""
    seq_len = attention.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention.device).tril()  # i >= k
    queries = causal[None] & valid[:, :, None] & valid[:, None, :]  # B, T(query), T(key)
    weights = queries[:, None].to(attention.dtype)  # B, 1, T, T
    return (attention * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)
