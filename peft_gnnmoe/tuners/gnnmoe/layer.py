"""The GNN-MoE adapter layer: frozen Linear + graph-routed mixture of Kronecker experts."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import GNNMoEConfig
from .kronecker import init_kron_experts, kron_moe_forward, kron_path
from .router import GraphRouter
from .sparse import dispatch_tokens, kron_moe_forward_sparse

_MERGE_ERROR = (
    "GNN-MoE adapters cannot be merged into the base weights: each token's update depends on its routing, which is "
    "computed from the whole image at run time, so no single weight matrix reproduces the adapted layer. Keep the "
    "adapter unmerged, or use unload() to get the base model back."
)


def make_router(in_features: int, config: GNNMoEConfig) -> GraphRouter:
    """A fresh router for a layer with ``in_features`` inputs, configured from ``config``."""
    router = GraphRouter(
        in_features,
        num_experts=config.num_experts,
        top_k=config.top_k,
        kind=config.router,
        hidden=config.router_hidden,
        num_layers=config.router_layers,
        heads=config.router_heads,
        dropout=config.router_dropout,
        noise_std=config.router_noise_std,
        temperature=config.router_temperature,
        graph=config.graph,
        knn_k=config.knn_k,
        graph_radius=config.graph_radius,
        prefix_mode=config.prefix_tokens,
        balance_loss=config.balance_loss,
        balance_loss_weight=config.balance_loss_weight,
        z_loss_weight=config.z_loss_weight,
        recompute=config.recompute_intermediates,
    )
    return router


class GNNMoELayer(BaseTunerLayer):
    """Adapter state of a GNN-MoE layer, per adapter name.

    Trainable: ``gnnmoe_rules`` (n, n, n), ``gnnmoe_left`` (E, n, in/n, r), ``gnnmoe_right`` (E, n, r, out/n),
    ``gnnmoe_bias`` (E, out; optional) and ``gnnmoe_router`` (the GNN router, registered only on the layer that owns
    it; layers in a shared-router group hold a plain reference in ``gnnmoe_router_ref``).
    """

    adapter_layer_names: tuple[str, ...] = (
        "gnnmoe_rules",
        "gnnmoe_left",
        "gnnmoe_right",
        "gnnmoe_bias",
        "gnnmoe_router",
    )
    other_param_names: tuple[str, ...] = ("gnnmoe_router_ref", "gnnmoe_dropout", "gnnmoe_dispatch", "gnnmoe_recompute")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.gnnmoe_rules = nn.ParameterDict({})
        self.gnnmoe_left = nn.ParameterDict({})
        self.gnnmoe_right = nn.ParameterDict({})
        self.gnnmoe_bias = nn.ParameterDict({})
        self.gnnmoe_router = nn.ModuleDict({})
        self.gnnmoe_dropout = nn.ModuleDict({})
        self.gnnmoe_router_ref: dict[str, GraphRouter] = {}
        self.gnnmoe_dispatch: dict[str, str] = {}  # GNNMoEConfig.expert_dispatch of every adapter
        self.gnnmoe_recompute: dict[str, bool] = {}  # GNNMoEConfig.recompute_intermediates of every adapter
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        # the Linear's own sizes, never weight.shape: DeepSpeed ZeRO-3 partitions the weight to shape [0] (the full
        # shape in weight.ds_shape) and FSDP2 shards it (tests/tuners/test_zero3_shapes.py, test_fsdp.py)
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: GNNMoEConfig, shared_router: GraphRouter | None = None) -> None:
        """Create the experts of ``adapter_name``; use ``shared_router`` or create (and own) a new router."""
        tensors = init_kron_experts(
            self.in_features,
            self.out_features,
            config.num_experts,
            config.kron_factor,
            config.kron_rank,
            zero_right=config.init_weights,
        )
        self.gnnmoe_rules[adapter_name] = nn.Parameter(tensors["rules"])
        self.gnnmoe_left[adapter_name] = nn.Parameter(tensors["left"])
        self.gnnmoe_right[adapter_name] = nn.Parameter(tensors["right"])
        if config.expert_bias:
            self.gnnmoe_bias[adapter_name] = nn.Parameter(tensors["bias"])
        self.gnnmoe_dropout[adapter_name] = (
            nn.Dropout(config.expert_dropout) if config.expert_dropout > 0 else nn.Identity()
        )
        self.gnnmoe_dispatch[adapter_name] = config.expert_dispatch
        self.gnnmoe_recompute[adapter_name] = config.recompute_intermediates
        if shared_router is None:
            shared_router = make_router(self.in_features, config)
            self.gnnmoe_router[adapter_name] = shared_router
        self.gnnmoe_router_ref[adapter_name] = shared_router
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def owns_router(self, adapter_name: str) -> bool:
        """Whether this layer holds (and saves) the router of ``adapter_name``."""
        return adapter_name in self.gnnmoe_router


class Linear(nn.Module, GNNMoELayer):
    """A ``nn.Linear`` with GNN-MoE adapters: ``y = base(x) + sum_e g_e(x) (x H_e + b_e)`` per active adapter.

    Input of shape (B, S, in_features) is routed as B graphs of S tokens. Input of shape (B, in_features) is routed
    token by token: each row is a graph of one node, so the router acts as an MLP on the row.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: GNNMoEConfig,
        shared_router: GraphRouter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        GNNMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, shared_router=shared_router)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(_MERGE_ERROR)

    def unmerge(self) -> None:
        warnings.warn("GNN-MoE adapters are never merged; nothing to unmerge.", stacklevel=2)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(_MERGE_ERROR)

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if x.dim() == 2:
            tokens = x.unsqueeze(1)  # B, 1, D: every row its own one-node graph
        elif x.dim() == 3:
            tokens = x  # B, S, D
        else:
            raise ValueError(
                f"GNN-MoE layers take (batch, tokens, features) or (batch, features) input, got shape "
                f"{tuple(x.shape)}. Target Linear layers that see token sequences."
            )
        if adapter_names is not None:
            return self._mixed_batch_forward(tokens, result, adapter_names)
        for adapter in self.active_adapters:
            if adapter in self.gnnmoe_left:
                result = result + self._delta(adapter, tokens).reshape(result.shape).to(result.dtype)
        return result

    def _delta(self, adapter: str, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' update of ``adapter`` for ``tokens`` (or only its ``rows``), routed by its router."""
        left = self.gnnmoe_left[adapter]
        router = self.gnnmoe_router_ref[adapter]
        routing = router(tokens, rows)
        selected = tokens if rows is None else tokens[rows]
        x = self.gnnmoe_dropout[adapter](selected.to(left.dtype))
        experts = (self.gnnmoe_rules[adapter], left, self.gnnmoe_right[adapter], self.gnnmoe_bias.get(adapter))
        num_experts, factor, _, rank = left.shape
        top_k = routing.topk_index.shape[-1]
        path = self.expert_path(adapter, num_experts, factor, rank, top_k)
        recompute = self.gnnmoe_recompute.get(adapter, True)
        if path == "sparse":  # the tokens grouped by expert once for the layers that share input and routing (q/k/v)
            index = routing.topk_index.reshape(-1, top_k)
            dispatch = router.shared(routing, x, lambda: dispatch_tokens(index, num_experts))
            return kron_moe_forward_sparse(x, routing.gates, routing.topk_index, *experts, dispatch, recompute)
        return kron_moe_forward(x, routing.gates, *experts, recompute)

    def expert_path(self, adapter: str, num_experts: int, factor: int, rank: int, top_k: int) -> str:
        """The order the experts of ``adapter`` run in: ``"sparse"`` or one of the dense orders (``kron_path``)."""
        setting = self.gnnmoe_dispatch.get(adapter, "auto")
        if setting == "sparse":
            return "sparse"
        chosen = top_k if setting == "auto" else None
        return kron_path(self.in_features, self.out_features, num_experts, factor, rank, chosen)

    def _mixed_batch_forward(
        self, tokens: torch.Tensor, result: torch.Tensor, adapter_names: list[str]
    ) -> torch.Tensor:
        """Every sample through the adapter named for it (``"__base__"``: none), routed by that adapter's router."""
        if len(adapter_names) != tokens.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {tokens.shape[0]}: pass one adapter "
                "name (or '__base__') per sample."
            )
        for adapter in sorted(set(adapter_names)):
            if adapter not in self.gnnmoe_left:  # "__base__", or an adapter that does not adapt this layer
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter], device=tokens.device)
            delta = self._delta(adapter, tokens, rows).reshape(result[rows].shape).to(result.dtype)
            result = result.index_add(0, rows, delta)
        return result

    def __repr__(self) -> str:
        return "gnnmoe." + super().__repr__()
