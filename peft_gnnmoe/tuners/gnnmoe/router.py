"""The graph router: a GCN / GAT / GraphSAGE over the token graph that assigns every token to its top-k experts.

Patch graphs have the same node count in every image, so the router runs torch_geometric's dense layers on a
(B, S, S) adjacency (batched matmuls) instead of edge lists and scatters. ``router="linear"`` is the token router
without message passing (MoA / GMoE): the same depth and width with ``nn.Linear`` layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn.dense import DenseGCNConv

from .gat import LeanDenseGATConv
from .graph import TokenLayout, infer_layout, needs_grid, token_adjacency
from .sage import LeanDenseSAGEConv


@dataclass
class Routing:
    """One routing decision for a batch of token sequences.

    The losses are per sample (one entry per sequence, over its real tokens only), so that the tuner can weight them
    like the model weights its own loss; ``aux_loss`` carries gradient, the others are detached.
    """

    gates: torch.Tensor  # B, S, E: renormalised top-k weights, zero for unselected experts
    topk_index: torch.Tensor  # B, S, k: chosen experts, best first
    aux_loss: torch.Tensor  # B: weighted load-balancing loss + z-loss of every sequence
    balance_loss: torch.Tensor  # B: unweighted balance loss of every sequence
    z_loss: torch.Tensor  # B: unweighted z-loss (mean over the sequence's real tokens)
    load: torch.Tensor  # E: share of the top-k assignments each expert received (real tokens)
    entropy: torch.Tensor  # scalar: mean entropy of the routing distribution (real tokens)
    layout: TokenLayout
    valid: torch.Tensor | None = None  # B, S bool: the real tokens (None: all)
    rows: torch.Tensor | None = None  # B: the samples of the model's batch routed here (mixed-adapter batches)
    batch_size: int = 0  # samples in the model's batch (B unless ``rows`` is set)


@dataclass(frozen=True)
class LayoutSpec:
    """What the tuner knows about the token layout of the layers a router serves (from the configs)."""

    num_prefix: int = 0
    grid_hint: tuple[int, int] | None = None
    explicit_grid: bool = False  # the hint is GNNMoEConfig.patch_grid: a mismatch is an error
    square_fallback: bool = True  # False when the patches are in no spatial order (ViT-MAE)


def _version(tokens: torch.Tensor) -> int | None:
    """The in-place version counter of ``tokens``, None where it cannot be read. Inference tensors have none (they
    cannot be changed in place outside inference mode); under torch.compile reading it breaks the graph (the traced
    code changes no layer input in place)."""
    if torch.compiler.is_compiling() or tokens.is_inference():
        return None
    return tokens._version


def _make_conv(kind: str, in_features: int, out_features: int, heads: int) -> nn.Module:
    if kind == "gcn":
        return DenseGCNConv(in_features, out_features)
    if kind == "gat":
        return LeanDenseGATConv(in_features, out_features // heads, heads=heads, concat=True)
    if kind == "sage":
        return LeanDenseSAGEConv(in_features, out_features)
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    raise ValueError(f"Unknown router type {kind!r}; use 'gcn', 'gat', 'sage' or 'linear'.")


# parameter names of torch_geometric's sparse layers (checkpoints before the dense router) -> the dense layers'
_SAGE_RENAMES = {"lin_l.weight": "lin_rel.weight", "lin_l.bias": "lin_root.bias", "lin_r.weight": "lin_root.weight"}
_OLD_ROUTER_KEY = re.compile(  # a router's own keys, or a tuner's (gnnmoe_router[.<adapter>].convs...)
    r"(^|\.gnnmoe_router\.(?:[^.]+\.)?)convs\.(\d+)\.(lin_l\.weight|lin_l\.bias|lin_r\.weight|att_src|att_dst)$"
)


def upgrade_router_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename / reshape router parameters saved with torch_geometric's sparse layers (``SAGEConv``'s ``lin_l`` /
    ``lin_r``, ``GATConv``'s (1, H, C) attention vectors) to the dense layers' layout; other keys pass unchanged.

    Only those layers used these names and shapes, so the keys alone identify them. Returns a new dict."""
    out = {}
    for key, value in state_dict.items():
        match = _OLD_ROUTER_KEY.search(key)
        if match is not None and match.group(3) in _SAGE_RENAMES:
            key = key[: match.start(3)] + _SAGE_RENAMES[match.group(3)]
        elif match is not None and value.dim() == 3:  # GATConv att_src / att_dst: (1, H, C) -> (1, 1, H, C)
            value = value.unsqueeze(0)
        out[key] = value
    return out


def _upgrade_old_router_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Load-state pre-hook: [`upgrade_router_state_dict`] on this router's entries, in place."""
    own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    state_dict.update(upgrade_router_state_dict(own))


class GraphRouter(nn.Module):
    """GNN router: ``router_layers`` torch_geometric dense convolutions (GELU between), then a Linear to expert logits.

    Calls with the very same input tensor (e.g. the q, k and v projections of one attention block) reuse the first
    call's routing, so layers that share a router also share one routing decision per forward pass. Calls with other
    inputs within the same forward pass are routed anew and all of them count in the auxiliary loss.

    The tuner calls ``start_forward(token_mask)`` before and ``end_forward()`` after every model call: the token mask
    (B, S) of the call's ``attention_mask`` marks the real tokens of inputs of that shape; padding is then no graph
    node and enters neither the losses nor the statistics.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        kind: str = "gcn",
        hidden: int = 64,
        num_layers: int = 1,
        heads: int = 4,
        dropout: float = 0.0,
        noise_std: float = 0.1,
        temperature: float = 1.0,
        graph: str = "knn+grid",
        knn_k: int = 8,
        graph_radius: float = 2.0,
        prefix_mode: str = "connect",
        balance_loss: str = "squared_mean",
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * num_layers
        self.convs = nn.ModuleList(_make_conv(kind, a, b, heads) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.dropout, self.noise_std, self.temperature = dropout, noise_std, temperature
        self.kind = kind
        self.recompute = recompute  # activation checkpointing of the convolutions and the head while training
        self.graph, self.knn_k, self.graph_radius, self.prefix_mode = graph, knn_k, float(graph_radius), prefix_mode
        self.balance_loss_kind = balance_loss
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.layout_spec = LayoutSpec()  # set by the tuner from the configs; not a parameter
        self.routings: list[Routing] = []  # every routing of the current (or last) forward pass
        self.token_mask: torch.Tensor | None = None
        self.pixel_grid: tuple[int, int] | None = None
        self._cache: tuple | None = None
        self._shared: list[tuple] = []  # (routing, input, version, value) of ``shared``
        self.register_load_state_dict_pre_hook(_upgrade_old_router_keys)

    @property
    def last_routing(self) -> Routing | None:
        """The last routing of the current (or last) forward pass, or None."""
        return self.routings[-1] if self.routings else None

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> Routing:
        """Route ``tokens`` (B, S, D), or only the samples ``rows`` of them (mixed-adapter batches); returns the cached
        routing when called again with the same tensor and rows."""
        key = (
            _version(tokens),
            self.training,
            torch.is_grad_enabled(),
            None if rows is None else tuple(rows.tolist()),
        )
        if self._cache is not None and self._cache[0] is tokens and self._cache[1] == key:
            return self._cache[2]
        routing = self._route(tokens, rows)
        self._cache = (tokens, key, routing)
        self.routings.append(routing)
        return routing

    def shared(self, routing: Routing, tokens: torch.Tensor, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per ``routing`` of this router and input ``tokens`` within a forward pass: the
        layers that share the router and the input (q / k / v) share the result (their tokens grouped by expert)."""
        version = _version(tokens)
        for seen_routing, seen_tokens, seen_version, value in self._shared:
            if seen_routing is routing and seen_tokens is tokens and seen_version == version:
                return value
        value = build()
        self._shared.append((routing, tokens, version, value))
        return value

    def start_forward(self, token_mask: torch.Tensor | None = None, pixel_grid: tuple[int, int] | None = None) -> None:
        """Forget the previous forward pass; ``token_mask`` (B, S) marks the real tokens of this one, ``pixel_grid``
        is the patch grid of its images (from ``pixel_values``), which wins over the model config's."""
        self._cache = None
        self._shared = []
        self.routings = []
        self.token_mask = token_mask
        self.pixel_grid = pixel_grid

    def end_forward(self) -> None:
        """Drop the input kept for reuse, the shared tensors and the token mask; the routings stay for statistics
        and the loss."""
        self._cache = None
        self._shared = []
        self.token_mask = None
        self.pixel_grid = None

    def clear(self) -> None:
        """Forget everything about past forward passes."""
        self.start_forward(None)

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save`` of the model) starts without the last forward pass's
        routings: they hang on the autograd graph of the model that ran it (and non-leaf tensors cannot be copied)."""
        state = self.__dict__.copy()
        state.update(routings=[], token_mask=None, pixel_grid=None, _cache=None, _shared=[])
        return state

    def _valid_tokens(self, batch: int, seq: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The token mask when it describes this input (same batch and length); other inputs have no padding (e.g.
        the image tokens of a CLIP model called with the text's attention_mask)."""
        mask = self.token_mask
        if mask is None or seq == 1 or tuple(mask.shape) != (batch, seq):
            return None
        mask = mask.to(device=self.head.weight.device, dtype=torch.bool)
        return mask if rows is None else mask[rows.to(mask.device)]

    def _route(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> Routing:
        valid = self._valid_tokens(tokens.shape[0], tokens.shape[1], rows)
        full_batch = tokens.shape[0]
        if rows is not None:
            tokens = tokens[rows]
        seq = tokens.shape[1]
        spec = self.layout_spec
        grid_hint = spec.grid_hint
        if self.pixel_grid is not None and spec.square_fallback and not spec.explicit_grid:
            grid_hint = self.pixel_grid  # the images of this call; an explicit patch_grid still wins
        layout = infer_layout(
            seq,
            spec.num_prefix if seq > 1 else 0,
            grid_hint,
            need_grid=(self.kind != "linear" and needs_grid(self.graph) and seq > 1),
            explicit_grid=spec.explicit_grid,
            square_fallback=spec.square_fallback,
        )
        h = tokens.to(self.head.weight.dtype)
        if self.kind == "linear":
            adj = None  # the token router: no graph, no message passing
        else:  # one adjacency per call, shared by every layer (and by q, k and v through the routing cache)
            adj = token_adjacency(tokens, layout, self.graph, self.knn_k, self.prefix_mode, valid, self.graph_radius)
        if self.recompute and torch.is_grad_enabled():  # keep the input and the bool graph, not the activations
            logits = checkpoint(self._logits, h, adj, use_reentrant=False)
        else:
            logits = self._logits(h, adj)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 / fp16 routers: softmax in fp32
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits / self.temperature, dim=-1)
        top_weights, topk_index = probs.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(-1, keepdim=True).clamp_min(1e-9)
        gates = torch.zeros_like(probs).scatter(-1, topk_index, top_weights)
        routing = self._losses(logits, probs, gates, topk_index, layout, valid)
        routing.rows, routing.batch_size = rows, full_batch
        return routing

    def _logits(self, h: torch.Tensor, adj: torch.Tensor | None) -> torch.Tensor:
        """Expert logits of the node features ``h`` (B, S, D) on the graphs ``adj`` (B, S, S bool; None: no message
        passing). With ``recompute`` it runs under activation checkpointing while training: its backward pass computes
        it again (the router's share of a step's work is small, its activations are not: the graph in float, two or
        three hidden states per node)."""
        if adj is not None and self.kind != "gat":  # GAT attends over the bool graph's links
            adj = adj.to(h.dtype)
        for i, conv in enumerate(self.convs):
            if i > 0:
                h = F.dropout(F.gelu(h), p=self.dropout, training=self.training)
            h = conv(h) if adj is None else conv(h, adj)
        return self.head(F.gelu(h))

    def _losses(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        gates: torch.Tensor,
        topk_index: torch.Tensor,
        layout: TokenLayout,
        valid: torch.Tensor | None,
    ) -> Routing:
        """Per-sequence balance and z-losses over the real tokens, and statistics over all real tokens."""
        weight = torch.ones(probs.shape[:2], device=probs.device) if valid is None else valid.to(probs.dtype)
        count = weight.sum(1).clamp_min(1.0)  # B: real tokens per sequence
        mean_probs = (probs * weight[..., None]).sum(1) / count[:, None]  # B, E
        assigned = F.one_hot(topk_index, self.num_experts).sum(-2).to(probs.dtype) * weight[..., None]  # B, S, E
        if self.balance_loss_kind == "switch":
            share = assigned.sum(1) / (count[:, None] * self.top_k)  # B, E: f_e of every sequence
            balance = self.num_experts * (share * mean_probs).sum(-1)
        else:
            balance = self.num_experts * mean_probs.pow(2).sum(-1)
        z_loss = (torch.logsumexp(logits, dim=-1).pow(2) * weight).sum(1) / count
        aux = self.balance_loss_weight * balance + self.z_loss_weight * z_loss
        total = weight.sum().clamp_min(1.0)
        load = assigned.sum((0, 1)) / (total * self.top_k)
        entropy = (-(probs * probs.clamp_min(1e-9).log()).sum(-1) * weight).sum() / total
        return Routing(
            gates=gates,
            topk_index=topk_index.detach(),
            aux_loss=aux,
            balance_loss=balance.detach(),
            z_loss=z_loss.detach(),
            load=load.detach(),
            entropy=entropy.detach(),
            layout=layout,
            valid=valid,
        )
