"""The GNN-MoE tuner: injects GNN-MoE layers into a model and adds the routers' auxiliary loss to its output."""

from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .architectures import VIT_FAMILY_TARGET_MODULES, num_prefix_tokens_from_config, patch_grid_from_config
from .config import GNNMoEConfig
from .layer import _MERGE_ERROR, GNNMoELayer, Linear
from .router import GraphRouter


class GNNMoEModel(BaseTuner):
    """GNN-MoE: every targeted Linear gets a mixture of Kronecker adapter experts, and a graph neural network router
    (GCN, GAT or GraphSAGE from torch_geometric) over the image's patch tokens assigns each token to its experts.

    Paper: "GNN-MoE: Context-Aware Patch Routing using GNNs for Parameter-Efficient Domain Generalization"
    (arXiv 2511.04008). Use it through ``get_peft_model(model, GNNMoEConfig(...))`` after ``import peft_gnnmoe``.

    Example:
        ```py
        >>> import torch, peft_gnnmoe
        >>> from peft import get_peft_model
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> vit = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...                                           intermediate_size=128, image_size=32, patch_size=8))
        >>> model = get_peft_model(vit, peft_gnnmoe.GNNMoEConfig(router="gat", modules_to_save=["classifier"]))
        >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
        >>> out.loss.backward()  # cross-entropy + the routers' load-balancing and z-losses
        ```
    """

    prefix: str = "gnnmoe_"
    tuner_layer_cls = GNNMoELayer
    target_module_mapping = VIT_FAMILY_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: GNNMoEConfig, model_config: dict) -> GNNMoEConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"GNN-MoE has no default target modules for model_type={model_type!r}. Pass "
                    "GNNMoEConfig(target_modules=[...]) naming Linear layers that see (batch, tokens, features) "
                    f"input; defaults exist for {sorted(self.target_module_mapping)}."
                )
        return super()._prepare_adapter_config(peft_config, model_config)

    def _token_layout(self, config: GNNMoEConfig) -> tuple[int, tuple[int, int] | None]:
        """(special tokens before the patches, patch grid hint) from the adapter config, else the model config."""
        model_config = getattr(self.model, "config", None)
        if config.num_prefix_tokens is not None:
            num_prefix = config.num_prefix_tokens
        else:
            num_prefix = num_prefix_tokens_from_config(model_config) if model_config is not None else 0
        if config.patch_grid is not None:
            grid = tuple(config.patch_grid)
        else:
            grid = patch_grid_from_config(model_config) if model_config is not None else None
        return num_prefix, grid

    def _create_and_replace(
        self,
        config: GNNMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"GNN-MoE adapts torch.nn.Linear layers only; {current_key} is {type(base).__name__}. "
                "Narrow target_modules to Linear layers."
            )
        shared = self._sibling_router(config, adapter_name, target_name, parent, base.in_features)
        try:
            if isinstance(target, GNNMoELayer):
                target.update_layer(adapter_name, config, shared_router=shared)
                layer = target
            else:
                layer = Linear(target, adapter_name, config, shared_router=shared)
                if adapter_name not in self.active_adapters:
                    layer.requires_grad_(False)
                self._replace_module(parent, target_name, layer, target)
        except ValueError as err:
            raise ValueError(f"Cannot adapt {current_key}: {err}") from err
        router = layer.gnnmoe_router_ref[adapter_name]
        router.num_prefix_tokens, router.grid_hint = self._token_layout(config)

    @staticmethod
    def _sibling_router(
        config: GNNMoEConfig, adapter_name: str, target_name: str, parent: nn.Module, in_features: int
    ) -> GraphRouter | None:
        """The router of an already adapted sibling in the same shared-router group (same parent, same input width)."""
        for names in config.shared_router_groups:
            if target_name not in names:
                continue
            for sibling_name in names:
                sibling = getattr(parent, sibling_name, None)
                if (
                    isinstance(sibling, GNNMoELayer)
                    and sibling_name != target_name
                    and adapter_name in sibling.gnnmoe_router_ref
                    and sibling.in_features == in_features
                ):
                    return sibling.gnnmoe_router_ref[adapter_name]
        return None

    def _post_injection_hook(self, model: nn.Module, config: GNNMoEConfig, adapter_name: str) -> None:
        if not hasattr(self, "_gnnmoe_hooks"):
            self._gnnmoe_hooks = [
                model.register_forward_pre_hook(self._clear_routers),
                model.register_forward_hook(self._add_aux_loss),
            ]
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["peft-gnnmoe", "gnnmoe"])

    # --- routers and auxiliary loss -------------------------------------------------------------------------------

    def active_routers(self) -> dict[str, GraphRouter]:
        """Routers of the active adapter(s), keyed by the owning layer's name (plus ``/adapter`` when several)."""
        routers = {}
        several = len(self.active_adapters) > 1
        for name, module in self.model.named_modules():
            if not isinstance(module, GNNMoELayer):
                continue
            for adapter in self.active_adapters:
                if module.owns_router(adapter):
                    routers[f"{name}/{adapter}" if several else name] = module.gnnmoe_router[adapter]
        return routers

    def _clear_routers(self, module: nn.Module, args: Any) -> None:
        for router in self.active_routers().values():
            router.clear()

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over routers of the weighted load-balancing and z-losses of the last forward pass (None if none ran)."""
        losses = [r.last_routing.aux_loss for r in self.active_routers().values() if r.last_routing is not None]
        return torch.stack(losses).sum() if losses else None

    def _add_aux_loss(self, module: nn.Module, args: Any, output: Any) -> Any:
        routers = self.active_routers().values()
        for router in routers:
            router.clear(keep_last=True)  # drop the input kept for reuse, keep statistics
        enabled = any(self.peft_config[a].add_aux_loss_to_output for a in self.active_adapters)
        if not enabled:
            return output
        loss = output.get("loss") if isinstance(output, dict) else None
        is_loss_tuple = isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0
        if loss is None and is_loss_tuple:
            loss = output[0]
        aux = self.aux_loss()
        if loss is None or aux is None:
            return output
        total = loss + aux.to(loss.dtype)
        if isinstance(output, dict):
            output["loss"] = total
            return output
        return (total, *output[1:])

    # --- merging, unloading, loading -----------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise ValueError(_MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        for handle in getattr(self, "_gnnmoe_hooks", []):
            handle.remove()
        self._gnnmoe_hooks = []
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # router weights sit deeper than one level below the adapter key: gnnmoe_router.<adapter>.convs.0.lin.weight
        pattern = r"(\.gnnmoe_router)\." + re.escape(adapter_name) + r"\."
        if re.search(pattern, key):
            return re.sub(pattern, r"\1.", key)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: GNNMoEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        missing = sorted(k for k in expected if k not in remapped)
        if missing:
            raise ValueError(
                f"The GNN-MoE adapter checkpoint does not match the model: {len(missing)} adapter tensors are missing "
                f"(e.g. {missing[:3]}). The adapter was saved from a different architecture or config, or the file "
                "is incomplete; load it onto the base model it was trained on."
            )
        return remapped
