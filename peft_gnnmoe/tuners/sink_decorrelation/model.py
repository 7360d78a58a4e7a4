from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import SinkDecorrelationConfig
from .layers import find_decoder_layers, resolve_layer_indices
from .loss import decorrelation_token_mask, find_bos_positions, layer_decorrelation_loss, valid_token_mask

# forward() keyword arguments consumed by the wrapper (removed before the transformers model sees them)
EXTRA_FORWARD_ARGS = ("bos_positions", "decorrelation_mask")


@dataclass
class _PendingLoss:
    """What one training forward needs between the pre-hook, the layer hooks and the post-hook."""

    config: SinkDecorrelationConfig
    indices: list[int]
    bos_positions: torch.Tensor
    token_mask: torch.Tensor
    has_labels: bool
    layer_losses: dict[int, torch.Tensor] = field(default_factory=dict)


class SinkDecorrelationModel(BaseTuner):
    """Sink decorrelation: train an inner PEFT adapter with ``CE + weight * L_decor`` (arXiv 2510.22603).

    ``L_decor`` lowers the cosine similarity between the BOS hidden state and every other selected token at the chosen
    decoder layers, which removes intermediate attention sinks and the massive activations that come with them.

    Design:
        * Injection is delegated to the inner method's own tuner (``LoraModel`` for a ``LoraConfig``), so the adapter
          layers are the inner method's real layers: merging, unloading, dtype casting and the structural save/load of
          peft 0.21 work unchanged, and the saved tensors have the inner method's usual keys. This tuner owns no
          parameters.
        * The loss is attached with a forward pre-hook and a forward hook on the transformers model, so it is applied
          whichever way the model is called (``PeftModel``, ``PeftModelForCausalLM``, ``Trainer``, DDP). Only in
          training mode with ``weight > 0`` and adapters enabled does the pre-hook register forward hooks on the chosen
          decoder layers; they compute each layer's loss from the layer output as it is produced (no
          ``output_hidden_states``) and are removed after the forward. In eval mode and in ``generate`` no layer hook
          exists.
        * ``forward`` accepts two extra keyword arguments: ``bos_positions`` (int or ``(B,)`` tensor, e.g. for
          multimodal ``inputs_embeds`` where BOS is not at a known token id) and ``decorrelation_mask`` (bool
          ``(B, T)``: the tokens to compare with BOS, replacing ``config.tokens``).

    Outputs: ``out.loss`` is the total; ``out.ce_loss`` and ``out.decorrelation_loss`` hold the parts (also on
    ``model.last_loss_parts``, detached, with the per-layer values). Without labels ``out.loss`` stays None and only
    the parts are set. Batches without any selected token give a decorrelation loss of 0.

    Example:
        ```py
        >>> import peft_gnnmoe
        >>> from peft import LoraConfig, get_peft_model
        >>> config = peft_gnnmoe.SinkDecorrelationConfig(base_config=LoraConfig(target_modules=["q_proj", "v_proj"]))
        >>> model = get_peft_model(llm, config)
        >>> out = model(input_ids=ids, attention_mask=mask, labels=labels)
        >>> out.loss, out.ce_loss, out.decorrelation_loss
        ```
    """

    prefix: str = "sink_decorrelation_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    # ---- injection -------------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: SinkDecorrelationConfig, adapter_name: str) -> None:
        if "_model_hooks" not in self.__dict__:
            self._model_hooks: list[RemovableHandle] = []
            self._layer_hooks: list[RemovableHandle] = []
            self._layer_paths: dict[str, str] = {}
            self._pending: _PendingLoss | None = None
            self._loss_enabled = True
            self.last_loss_parts: dict[str, Any] = {}

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("SinkDecorrelationModel delegates layer creation to the inner PEFT method's tuner.")

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Validate the layer selection, then let the inner method's tuner inject its adapter layers into ``model``."""
        config = self.peft_config[adapter_name]
        path, layers = find_decoder_layers(model, config.layers_module)
        resolve_layer_indices(config.layers, len(layers))  # raises early on layers that do not exist
        self._layer_paths[adapter_name] = path

        had_adapters = any(isinstance(m, BaseTunerLayer) for m in model.modules())
        if config.base_config is not None:
            config.base_config.inference_mode = config.inference_mode
            inner = _inject_inner_adapter(config.base_config, model, adapter_name, low_cpu_mem_usage, state_dict)
            self.targeted_module_names.extend(n for n in inner if n not in self.targeted_module_names)
        elif not had_adapters:
            for param in model.parameters():
                param.requires_grad_(False)
        # the inner tuner activated the new adapter; restore the active one(s), as peft does when adding an adapter
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _post_injection_hook(self, model: nn.Module, config: SinkDecorrelationConfig, adapter_name: str) -> None:
        if not self._model_hooks:
            self._model_hooks = [
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
            ]

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # the inner config decides e.g. which biases are trainable and therefore saved
        inner = config.base_config if config.base_config is not None else config
        return super()._get_adapter_state_dict(model, inner, adapter_name, state_dict, unwanted_adapter_names)

    # ---- adapter switches ------------------------------------------------------------------------------------------

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._loss_enabled = enabled
        super()._enable_adapter_layers(enabled)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("SinkDecorrelationModel does not support mixed-adapter batches (adapter_names=...).")
        yield

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._remove_hooks()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _remove_hooks(self) -> None:
        for handle in self._model_hooks + self._layer_hooks:
            handle.remove()
        self._model_hooks, self._layer_hooks, self._pending = [], [], None

    # ---- the loss --------------------------------------------------------------------------------------------------

    def _active_config(self) -> tuple[str, SinkDecorrelationConfig] | None:
        adapters = [a for a in self.active_adapters if a in self.peft_config]
        if not adapters:
            return None
        if len(adapters) > 1:
            raise ValueError(f"the decorrelation loss needs one active adapter, got {adapters}.")
        return adapters[0], self.peft_config[adapters[0]]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        extra = {name: kwargs.pop(name) for name in EXTRA_FORWARD_ARGS if name in kwargs}
        for handle in self._layer_hooks:  # left over by a forward that raised
            handle.remove()
        self._layer_hooks, self._pending = [], None
        active = self._active_config()
        if active is None or not (module.training and self._loss_enabled and active[1].weight > 0):
            return args, kwargs
        adapter_name, config = active

        inputs = _bind_forward_inputs(module, args, kwargs)
        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("the decorrelation loss needs input_ids or inputs_embeds.")
        batch_size, seq_len = reference.shape[:2]
        valid = valid_token_mask(inputs.get("attention_mask"), batch_size, seq_len, reference.device)
        bos_token_id = config.bos_token_id
        if bos_token_id is None:
            bos_token_id = getattr(_text_config(module), "bos_token_id", None)
        bos_positions = find_bos_positions(
            valid, input_ids, bos_token_id, config.bos, bos_positions=extra.get("bos_positions")
        )
        token_mask = decorrelation_token_mask(
            valid, bos_positions, config.tokens, inputs.get("labels"), extra.get("decorrelation_mask")
        )

        layers = module.get_submodule(self._layer_paths[adapter_name])
        indices = resolve_layer_indices(config.layers, len(layers))
        has_labels = inputs.get("labels") is not None
        self._pending = _PendingLoss(config, indices, bos_positions, token_mask, has_labels)
        self._layer_hooks = [layers[i].register_forward_hook(partial(self._capture_layer, i)) for i in indices]
        return args, kwargs

    def _capture_layer(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        pending = self._pending
        if pending is None or index in pending.layer_losses:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output  # B, T, D residual stream
        pending.layer_losses[index] = layer_decorrelation_loss(
            hidden, pending.bos_positions, pending.token_mask, pending.config.form
        )

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending, self._pending = self._pending, None
        for handle in self._layer_hooks:
            handle.remove()
        self._layer_hooks = []
        if pending is None or output is None:
            return None
        missing = sorted(set(pending.indices) - set(pending.layer_losses))
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in this forward; cannot compute their loss.")
        decor = torch.stack([pending.layer_losses[i] for i in pending.indices]).mean()
        is_tuple = isinstance(output, tuple)
        ce = output[0] if is_tuple and pending.has_labels else None
        if not is_tuple:
            ce = getattr(output, "loss", None)
        total = None if ce is None else ce + pending.config.weight * decor.to(ce.dtype)
        self.last_loss_parts = {
            "loss": None if total is None else total.detach(),
            "ce_loss": None if ce is None else ce.detach(),
            "decorrelation_loss": decor.detach(),
            "weight": pending.config.weight,
            "per_layer": {i: pending.layer_losses[i].detach() for i in pending.indices},
        }
        if is_tuple:
            return output if total is None else (total,) + output[1:]
        if total is not None:
            output.loss = total
        output.ce_loss = ce
        output.decorrelation_loss = decor
        return output


def _inject_inner_adapter(
    base_config, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool, state_dict
) -> list[str]:
    """Inject ``base_config``'s adapter layers into ``model`` with that method's own tuner; return targeted names."""
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(base_config.peft_type)
    if tuner_cls is None:
        raise ValueError(f"unknown inner PEFT type {base_config.peft_type!r}.")
    if tuner_cls.uses_shared_state:
        raise ValueError(f"{base_config.peft_type} keeps state on its tuner and cannot be used as base_config.")
    # the inner tuner must not see (and extend) the outer peft_config dict that a previous adapter left on the model
    outer_peft_config = model.__dict__.pop("peft_config", None)
    try:
        inner = tuner_cls(model, base_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
    finally:
        model.__dict__.pop("peft_config", None)
        if outer_peft_config is not None:
            model.peft_config = outer_peft_config
    return list(inner.targeted_module_names)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind_forward_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the forward arguments (``input_ids`` may come positionally)."""
    if not args:
        return kwargs
    signature = _SIGNATURES.get(type(module))
    if signature is None:
        signature = _SIGNATURES[type(module)] = inspect.signature(module.forward)
    return dict(signature.bind_partial(*args, **kwargs).arguments) | kwargs
