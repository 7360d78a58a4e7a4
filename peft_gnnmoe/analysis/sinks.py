"""Attention-sink scores (Gu et al., "When Attention Sink Emerges"): the attention mass each key position receives.

For layer ``l``, head ``h`` and key ``k`` of one sequence with attention weights ``A[l, h, i, k]``,

    alpha[l, h, k] = (1 / |Q_k|) * sum_{i in Q_k} A[l, h, i, k],

where ``Q_k`` are the valid queries that can see ``k``: ``i >= k`` in a causal model, every valid query in an encoder.
Uniform attention over the visible keys gives the **baseline** ``u_k``: for a causal model of ``T`` valid tokens
(positions counted from the first valid one) ``u_k = (1 / (T - k)) * sum_{i=k}^{T-1} 1 / (i + 1)`` (so
``u_0 = H_T / T``, above 0.3 for ``T <= 9``), for an encoder ``u_k = 1 / T``. A key is a sink where its score exceeds
``threshold`` (0.3) **and** ``ratio`` (2) times its baseline: judged on the mean over layers and heads (``sinks``) and
on every layer's mean over heads (``layer_sinks``; intermediate sinks live in some layers only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._inputs import Batch, as_batch, inference, is_causal, to_list, valid_mask


@dataclass
class AttentionSinkReport:
    """Result of [`attention_sink_scores`][peft_gnnmoe.analysis.attention_sink_scores] (``to_dict()``: JSON-ready).

    ``scores[b][l][h][k]`` is ``alpha`` of sequence ``b`` (0 at padding), ``layer_scores[b][l][k]`` its mean over
    heads, ``mean_scores[b][k]`` its mean over layers and heads; ``baseline[b][k]`` is the uniform-attention score
    and ``relative_layer_scores`` / ``relative_mean_scores`` the scores divided by it; ``sink_rate[b][k]`` is the
    share of (layer, head) pairs whose score exceeds ``threshold`` (sail-sg/Attention-Sink's Sink_epsilon).
    ``sinks`` lists the keys whose mean score passes both tests (``{"batch", "token", "score", "relative"}``);
    ``layer_sinks`` the keys that pass them at one layer or more (``{"batch", "token", "layers", "scores",
    "relative"}``, one value per listed layer).
    """

    threshold: float
    ratio: float
    causal: bool
    scores: list
    layer_scores: list
    mean_scores: list
    baseline: list
    relative_layer_scores: list
    relative_mean_scores: list
    sink_rate: list
    sinks: list[dict]
    layer_sinks: list[dict]

    def sink_tokens(self, layer: int | None = None, batch: int = 0) -> list[int]:
        """Sink positions of sequence ``batch``: on the mean over layers (``layer=None``) or at ``layer``."""
        if layer is None:
            return [s["token"] for s in self.sinks if s["batch"] == batch]
        return [s["token"] for s in self.layer_sinks if s["batch"] == batch and layer in s["layers"]]

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


def attention_sink_scores(
    model: nn.Module, batch: Batch, threshold: float = 0.3, ratio: float = 2.0, causal: bool | None = None
) -> AttentionSinkReport:
    """Attention mass received by every key position, per layer and head, for every sequence of ``batch``.

    The model is run once with eager attention and ``output_attentions=True`` (switched back afterwards).

    Args:
        model: a transformers model (or a ``PeftModel`` around one), decoder or encoder (ViTs too).
        batch: forward kwargs (``input_ids`` or ``inputs_embeds``, optional 2-D ``attention_mask``; or an image
            model's ``pixel_values``: every query sees every token) or an id tensor.
        threshold: minimum score of a sink.
        ratio: minimum score / uniform-attention baseline of a sink.
        causal: whether queries see only earlier keys; detected from the model when None (see ``is_causal``).
    """
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be >= 1 (a multiple of the uniform-attention score), got {ratio}.")
    batch = as_batch(batch)
    causal = is_causal(model, causal)
    with inference(model) as base, eager_attention(base):
        outputs = base(**batch, output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError(f"{type(base).__name__} returned no attention weights; it needs eager attention support.")
    valid = valid_mask(batch, attentions[0].shape[-1])

    queries = visible_queries(valid.cpu(), causal)  # B, T(query), T(key)
    alpha = torch.stack([received_attention(a.detach().float().cpu(), queries) for a in attentions], dim=1)
    baseline = uniform_baseline(queries)  # B, T
    layer_scores = alpha.mean(dim=2)  # B, L, T
    mean_scores = layer_scores.mean(dim=1)  # B, T
    safe = baseline.clamp_min(1e-12)
    relative_layer = torch.where(baseline[:, None] > 0, layer_scores / safe[:, None], 0.0)
    relative_mean = torch.where(baseline > 0, mean_scores / safe, 0.0)
    return AttentionSinkReport(
        threshold=threshold,
        ratio=ratio,
        causal=causal,
        scores=to_list(alpha, 4),
        layer_scores=to_list(layer_scores, 4),
        mean_scores=to_list(mean_scores, 4),
        baseline=to_list(baseline, 4),
        relative_layer_scores=to_list(relative_layer, 3),
        relative_mean_scores=to_list(relative_mean, 3),
        sink_rate=to_list((alpha > threshold).float().mean(dim=(1, 2)), 4),
        sinks=_mean_sinks(mean_scores, relative_mean, threshold, ratio),
        layer_sinks=_layer_sinks(layer_scores, relative_layer, threshold, ratio),
    )


def visible_queries(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(B, T, T)`` bool: query ``i`` (dim 1) is valid and sees the valid key ``k`` (dim 2); ``i >= k`` if causal."""
    pairs = valid[:, :, None] & valid[:, None, :]
    if causal:
        seq_len = valid.shape[1]
        pairs &= torch.ones(seq_len, seq_len, dtype=torch.bool, device=valid.device).tril()
    return pairs


def received_attention(attention: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``alpha[b, h, k]``: mean of ``attention[b, h, i, k]`` over the queries ``i`` of ``queries[b, :, k]``."""
    weights = queries[:, None].to(attention.dtype)  # B, 1, T, T
    return (attention * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)


def uniform_baseline(queries: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` score every key would get if each query spread its attention evenly over the keys it sees."""
    visible = queries.float()
    uniform = visible / visible.sum(dim=2, keepdim=True).clamp_min(1.0)  # B, T(query), T(key)
    return received_attention(uniform[:, None], queries)[:, 0]


def _mean_sinks(scores: torch.Tensor, relative: torch.Tensor, threshold: float, ratio: float) -> list[dict]:
    hits = ((scores > threshold) & (relative > ratio)).nonzero().tolist()
    return [
        {"batch": b, "token": k, "score": round(scores[b, k].item(), 4), "relative": round(relative[b, k].item(), 3)}
        for b, k in hits
    ]


def _layer_sinks(scores: torch.Tensor, relative: torch.Tensor, threshold: float, ratio: float) -> list[dict]:
    """One entry per (sequence, key) that is a sink at one layer or more, with those layers and their scores."""
    hits = (scores > threshold) & (relative > ratio)  # B, L, T
    entries = []
    for b, k in hits.any(dim=1).nonzero().tolist():
        layers = hits[b, :, k].nonzero().flatten().tolist()
        entries.append(
            {
                "batch": b,
                "token": k,
                "layers": layers,
                "scores": [round(scores[b, layer, k].item(), 4) for layer in layers],
                "relative": [round(relative[b, layer, k].item(), 3) for layer in layers],
            }
        )
    return entries
