"""The graph router: a GCN / GAT / GraphSAGE over the token graph that assigns every token to its top-k experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv

from .graph import TokenLayout, build_token_graph, infer_layout


@dataclass
class Routing:
    """One routing decision for a batch of token sequences."""

    gates: torch.Tensor  # B, S, E: renormalised top-k weights, zero for unselected experts
    topk_index: torch.Tensor  # B, S, k: chosen experts, best first
    aux_loss: torch.Tensor  # scalar: weighted load-balancing loss + z-loss (carries gradient)
    balance_loss: torch.Tensor  # scalar, unweighted, detached
    z_loss: torch.Tensor  # scalar, unweighted, detached
    load: torch.Tensor  # E: share of the top-k assignments each expert received, detached
    entropy: torch.Tensor  # scalar: mean entropy of the routing distribution, detached
    layout: TokenLayout


def _make_conv(kind: str, in_features: int, out_features: int, heads: int) -> nn.Module:
    if kind == "gcn":
        return GCNConv(in_features, out_features)
    if kind == "gat":
        return GATConv(in_features, out_features // heads, heads=heads, concat=True)
    if kind == "sage":
        return SAGEConv(in_features, out_features)
    raise ValueError(f"Unknown router type {kind!r}; use 'gcn', 'gat' or 'sage'.")


class GraphRouter(nn.Module):
    """GNN router: ``router_layers`` torch_geometric convolutions (GELU between), then a Linear to expert logits.

    Calls with the very same input tensor (e.g. the q, k and v projections of one attention block) reuse the first
    call's routing, so layers that share a router also share one routing decision per forward pass.
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
        prefix_mode: str = "connect",
        balance_loss: str = "squared_mean",
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * num_layers
        self.convs = nn.ModuleList(_make_conv(kind, a, b, heads) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.dropout, self.noise_std, self.temperature = dropout, noise_std, temperature
        self.graph, self.knn_k, self.prefix_mode = graph, knn_k, prefix_mode
        self.balance_loss_kind = balance_loss
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        # set by the tuner from the model config; not parameters
        self.num_prefix_tokens = 0
        self.grid_hint: tuple[int, int] | None = None
        self.last_routing: Routing | None = None
        self._cache: tuple | None = None

    def forward(self, tokens: torch.Tensor) -> Routing:
        """Route ``tokens`` (B, S, D); returns the cached routing when called again with the same tensor."""
        key = (tokens, tokens._version, self.training, torch.is_grad_enabled())
        if self._cache is not None and self._cache[0] is tokens and self._cache[1:4] == key[1:]:
            return self._cache[-1]
        routing = self._route(tokens)
        self._cache = (*key, routing)
        self.last_routing = routing
        return routing

    def clear(self, keep_last: bool = False) -> None:
        """Drop the cached routing (and, unless ``keep_last``, the last routing kept for statistics)."""
        self._cache = None
        if not keep_last:
            self.last_routing = None

    def _route(self, tokens: torch.Tensor) -> Routing:
        batch, seq, dim = tokens.shape
        num_prefix = min(self.num_prefix_tokens, seq) if seq > 1 else 0
        layout = infer_layout(seq, num_prefix, self.grid_hint, need_grid=(self.graph == "grid" and seq > 1))
        edge_index = build_token_graph(tokens, layout, self.graph, self.knn_k, self.prefix_mode)
        h = tokens.reshape(batch * seq, dim).to(self.head.weight.dtype)
        for i, conv in enumerate(self.convs):
            if i > 0:
                h = F.dropout(F.gelu(h), p=self.dropout, training=self.training)
            h = conv(h, edge_index)
        logits = self.head(F.gelu(h)).float().view(batch, seq, self.num_experts)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits / self.temperature, dim=-1)
        top_weights, topk_index = probs.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(-1, keepdim=True).clamp_min(1e-9)
        gates = torch.zeros_like(probs).scatter(-1, topk_index, top_weights)

        mean_probs = probs.reshape(-1, self.num_experts).mean(0)
        load = F.one_hot(topk_index, self.num_experts).reshape(-1, self.num_experts).float().mean(0)
        if self.balance_loss_kind == "switch":
            balance = self.num_experts * (load * mean_probs).sum()
        else:
            balance = self.num_experts * (mean_probs**2).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        aux = self.balance_loss_weight * balance + self.z_loss_weight * z_loss
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        return Routing(
            gates=gates,
            topk_index=topk_index.detach(),
            aux_loss=aux,
            balance_loss=balance.detach(),
            z_loss=z_loss.detach(),
            load=load.detach(),
            entropy=entropy.detach(),
            layout=layout,
        )
