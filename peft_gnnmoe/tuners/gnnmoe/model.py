"""The GNN-MoE tuner: injects GNN-MoE layers into a model and adds the routers' auxiliary loss to its output."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ...utils.hooks import install_model_hooks
from ...utils.loss_terms import (
    LossContext,
    add_to_loss,
    forward_arguments,
    loss_context,
    sample_weights,
    warn_once,
)
from ...utils.packing import sequence_starts
from ...utils.peft_internals import filter_state_dict_by_key_prefixes, tuner_state_dict_key_prefixes
from .architectures import (
    VIT_FAMILY_TARGET_MODULES,
    num_prefix_tokens_from_config,
    patch_grid_from_config,
    patch_grid_from_pixels,
    patches_in_spatial_order,
)
from .config import GNNMoEConfig
from .layer import _MERGE_ERROR, GNNMoELayer, Linear
from .router import GraphRouter, LayoutSpec, upgrade_router_state_dict


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

    def _layout_spec(self, config: GNNMoEConfig, current_key: str) -> LayoutSpec:
        """Special tokens before the patches and the patch grid, from the adapter config, else the model config."""
        model_config = getattr(self.model, "config", None)
        if config.num_prefix_tokens is not None:
            num_prefix = config.num_prefix_tokens
        else:
            num_prefix = num_prefix_tokens_from_config(model_config) if model_config is not None else 0
        model_grid = patch_grid_from_config(model_config) if model_config is not None else None
        if model_config is not None and not patches_in_spatial_order(model_config, current_key):
            if "grid" in config.graph:
                raise ValueError(
                    f"{getattr(model_config, 'model_type', 'this model')} shuffles (and drops) the patch tokens at "
                    f"random before {current_key}, so they have no grid layout and graph={config.graph!r} cannot "
                    "link spatial neighbours. Use GNNMoEConfig(graph='knn')."
                )
            return LayoutSpec(num_prefix, None, explicit_grid=False, square_fallback=False)
        if config.patch_grid is None:
            return LayoutSpec(num_prefix, model_grid)
        grid = (int(config.patch_grid[0]), int(config.patch_grid[1]))
        if model_grid is not None and grid != model_grid and grid[0] * grid[1] == model_grid[0] * model_grid[1]:
            raise ValueError(
                f"GNNMoEConfig(patch_grid={list(grid)}) contradicts the model config, whose images give a "
                f"{model_grid[0]} x {model_grid[1]} patch grid with the same number of patches. Use "
                f"patch_grid={list(model_grid)} or None (read from the model config)."
            )
        return LayoutSpec(num_prefix, grid, explicit_grid=True)

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
        layer.gnnmoe_router_ref[adapter_name].layout_spec = self._layout_spec(config, current_key)

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
        if not getattr(self, "_gnnmoe_hooks", None):
            self._gnnmoe_hooks = install_model_hooks(model, self._before_forward, self._after_forward)
            self._loss_context: LossContext | None = None
            self._last_aux_loss: torch.Tensor | None = None
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["peft-gnnmoe", "gnnmoe"])

    def __getstate__(self) -> dict:
        """A copy starts without the last forward pass's auxiliary loss and loss context (see GraphRouter)."""
        state = self.__dict__.copy()
        state.update(_last_aux_loss=None, _loss_context=None)
        return state

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches as in LoRA: ``model(..., adapter_names=[...])`` sends every sample through the
        adapter named for it (``"__base__"``: the base model), routed by that adapter's routers; inference only.

        PeftModel.forward / generate enter this context with the call's kwargs; for its duration every GNN-MoE layer
        and every ``modules_to_save`` wrapper gets ``adapter_names`` through a forward pre-hook.
        """
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass adapter_names (a mixed-adapter batch) in training mode: call model.eval() first, or "
                "train one adapter at a time with set_adapter(name)."
            )
        known = set(self.peft_config)
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {sorted(known)} and '__base__'.")
        names = list(adapter_names)
        handles = [
            module.register_forward_pre_hook(partial(_inject_adapter_names, adapter_names=names), with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, (GNNMoELayer, AuxiliaryTrainingWrapper))
        ]
        self._mixed_adapters = sorted(set(names) - {"__base__"})
        try:
            yield
        finally:
            self._mixed_adapters = None
            for handle in handles:
                handle.remove()

    # --- routers and auxiliary loss -------------------------------------------------------------------------------

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._invalidate_router_cache()
        try:
            super().inject_adapter(*args, **kwargs)
        finally:
            self._invalidate_router_cache()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._invalidate_router_cache()

    def set_adapter(self, *args: Any, **kwargs: Any) -> None:
        super().set_adapter(*args, **kwargs)
        self._invalidate_router_cache()

    def _invalidate_router_cache(self) -> None:
        """Forget the cached router lists (the model's GNN-MoE layers or their adapters changed)."""
        self.__dict__["_router_cache"] = {}

    def _routers(self, adapters: list[str]) -> dict[str, GraphRouter]:
        """The routers owned by ``adapters``, keyed by layer name; cached (the model hooks ask several times per
        forward pass, and walking ``named_modules()`` costs more than a small router), rebuilt after
        add / delete / set_adapter and unload."""
        cache = self.__dict__.setdefault("_router_cache", {})
        key = tuple(adapters)
        if key not in cache:
            routers = {}
            several = len(adapters) > 1
            for name, module in self.model.named_modules():
                if not isinstance(module, GNNMoELayer):
                    continue
                for adapter in adapters:
                    if module.owns_router(adapter):
                        routers[f"{name}/{adapter}" if several else name] = module.gnnmoe_router[adapter]
            cache[key] = routers
        return cache[key]

    def active_routers(self) -> dict[str, GraphRouter]:
        """Routers of the active adapter(s), keyed by the owning layer's name (plus ``/adapter`` when several)."""
        return dict(self._routers(list(self.active_adapters)))

    def _forward_routers(self) -> list[GraphRouter]:
        """The routers that route this forward pass: the active adapters', or those named in ``adapter_names``."""
        mixed = getattr(self, "_mixed_adapters", None)
        return list(self._routers(mixed if mixed is not None else list(self.active_adapters)).values())

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Read the call's labels / ``num_items_in_batch`` / attention mask; hand the mask and the patch grid of the
        call's ``pixel_values`` to the routers."""
        named = forward_arguments(module, args, kwargs)
        self._loss_context = loss_context(module, args, kwargs, named=named)
        self._last_aux_loss = None
        mask = self._loss_context.attention_mask
        token_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        _refuse_packed_rows(named.get("position_ids"), mask)
        pixel_grid = patch_grid_from_pixels(getattr(module, "config", None), named.get("pixel_values"))
        for router in self._routers(list(self.peft_config)).values():
            router.start_forward(None)  # no adapter keeps routings of an earlier call
        for router in self._forward_routers():
            router.start_forward(token_mask, pixel_grid)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        routers = self._forward_routers()
        for router in routers:
            router.end_forward()  # drop the input kept for reuse and the mask, keep the routings
        context, self._loss_context = self._loss_context, None
        if output is None:  # the forward raised (the hook is always called)
            return None
        self._last_aux_loss = self._weighted_aux_loss(routers, context, module)
        adapters = getattr(self, "_mixed_adapters", None) or self.active_adapters
        enabled = any(self.peft_config[a].add_aux_loss_to_output for a in adapters)
        if not enabled or self._last_aux_loss is None:
            return output
        output, added = add_to_loss(output, self._last_aux_loss)
        if not added and module.training and torch.is_grad_enabled():
            warn_once(
                self,
                "no-loss",
                "The model output carries no loss (no labels, or labels popped by e.g. Trainer's label smoothing or "
                "compute_loss_func), so the GNN-MoE routers' auxiliary loss was not added and the routers train "
                "without load balancing. Add peft_gnnmoe.get_aux_loss(model) to your loss, or set "
                "GNNMoEConfig(add_aux_loss_to_output=False) when you do so on purpose.",
            )
        return output

    def _weighted_aux_loss(
        self, routers: list[GraphRouter], context: LossContext | None, model: nn.Module
    ) -> torch.Tensor | None:
        """``sum_b w_b * aux_b`` over every routing of the forward, with ``w_b`` weighting sample ``b`` as the model
        weights its loss (``peft_gnnmoe.utils.loss_terms``): gradient accumulation and several processes give the
        same gradients as one big batch."""
        terms: dict[int, list[torch.Tensor]] = {}
        for router in routers:
            for routing in router.routings:
                aux = routing.aux_loss
                if routing.rows is not None:  # a mixed-adapter batch: this adapter's samples only
                    aux = aux.new_zeros(routing.batch_size).index_add(0, routing.rows.to(aux.device), aux)
                terms.setdefault(aux.shape[0], []).append(aux)
        if not terms:
            return None
        total = None
        for batch_size, per_sample in terms.items():
            summed = torch.stack(per_sample).sum(0)
            weights = self._sample_weights(context, model, batch_size, summed.device)
            term = (weights * summed).sum()
            total = term if total is None else total + term
        return total

    def _sample_weights(
        self, context: LossContext | None, model: nn.Module, batch_size: int, device: torch.device
    ) -> torch.Tensor:
        if context is None:
            return torch.full((batch_size,), 1.0 / batch_size, device=device)
        try:
            return sample_weights(context, model, batch_size, device)
        except ValueError as err:  # routed rows are not the samples (e.g. a Linear fed flattened tokens)
            warn_once(
                self,
                f"rows{batch_size}",
                f"GNN-MoE routed {batch_size} sequences but cannot match them to the samples ({err}); their auxiliary "
                "loss is averaged over the sequences, which is not invariant to gradient accumulation or several "
                "processes. Target Linear layers that see (batch, tokens, features) input.",
            )
            return torch.full((batch_size,), 1.0 / batch_size, device=device)

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing + z-loss of the last forward pass, summed over routers (None if none ran).

        Each sequence's losses (over its real tokens) are weighted like the model weights its own loss, see
        ``_weighted_aux_loss``; this is the term added to ``outputs.loss`` when ``add_aux_loss_to_output=True``.
        """
        return getattr(self, "_last_aux_loss", None)

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
        self._invalidate_router_cache()
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
        state_dict = upgrade_router_state_dict(state_dict)  # routers saved with the sparse torch_geometric layers
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        missing = sorted(k for k in expected if k not in remapped)
        if missing:
            raise ValueError(
                f"The GNN-MoE adapter checkpoint does not match the model: {len(missing)} adapter tensors are missing "
                f"(e.g. {missing[:3]}). The adapter was saved from a different architecture or config, or the file "
                "is incomplete; load it onto the base model it was trained on."
            )
        unexpected = sorted(k for k in remapped if f".{cls.prefix}" in k and k not in expected)
        if unexpected:
            raise ValueError(
                f"The GNN-MoE adapter checkpoint does not match the model: {len(unexpected)} adapter tensors have no "
                f"place in it (e.g. {unexpected[:3]}). The adapter was saved from a model with more adapted layers, "
                "or its adapter_config.json was edited (e.g. expert_bias, target_modules); load it onto the base "
                "model and with the config it was trained with."
            )
        return remapped


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _refuse_packed_rows(position_ids: Any, attention_mask: Any) -> None:
    """Raise on rows that hold several packed sequences (``position_ids`` restart, no ``attention_mask``, as in TRL's
    padding-free batches): a router builds one graph per row, whose edges would link tokens of different sequences."""
    if attention_mask is not None or not torch.is_tensor(position_ids) or position_ids.dim() != 2:
        return
    if bool(sequence_starts(position_ids)[:, 1:].any()):
        raise ValueError(
            "GNN-MoE routers build one graph per row, and this row holds several packed sequences (position_ids "
            "restart and there is no attention_mask, as in padding-free batches): their graphs would link tokens of "
            "different sequences. Packed rows are not supported: train without packing (TRL: "
            "SFTConfig(packing=False, padding_free=False)) or pass one sequence per row with an attention_mask."
        )
