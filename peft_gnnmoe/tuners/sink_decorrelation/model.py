from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput

from ...utils.hooks import install_model_hooks
from ...utils.loss_terms import (
    LossContext,
    add_to_loss,
    forward_arguments,
    loss_context,
    sample_weights,
    warn_once,
)
from ...utils.model_introspection import bos_token_id, find_decoder_layers, resolve_layer_indices
from ...utils.packing import PackedLayout, packed_layout
from ...utils.peft_internals import inject_inner_adapter
from .calls import CallRegistry, SinkCall, check_gradient_checkpointing
from .config import SinkDecorrelationConfig
from .loss import decorrelation_token_mask, find_bos_positions, reduce_layer_sums, valid_token_mask

# forward() keyword arguments consumed by the wrapper (removed before the transformers model sees them)
EXTRA_FORWARD_ARGS = ("bos_positions", "decorrelation_mask")
# forward() arguments that carry a KV cache (transformers 5.24 calls it ``cache``, earlier releases
# ``past_key_values``): a call with a cache is a decoding step and never computes the loss
CACHE_ARGS = ("cache", "past_key_values")
# forward() arguments of padding-free batches besides position_ids (TRL's and transformers' flattening collators)
PACKING_ARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


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
          whichever way the model is called (``PeftModel``, ``Trainer``, accelerate, DDP, ``nn.DataParallel``). Only
          in training mode with ``weight > 0``, adapters enabled and no KV cache passed (so never on ``generate``'s
          steps) does the pre-hook register forward hooks on the chosen decoder layers, for this call and this thread
          only; they compute each layer's term from the layer output as it is produced, on that output's device, and
          are removed when the forward ends, also when it raised.
        * With ``reduction="sample"`` (default) every sequence gets its own term, added as
          ``sum_b w_b * L[b]`` with the weights of ``peft_gnnmoe.utils.loss_terms.sample_weights`` (the model's own
          normalisation: ``num_items_in_batch`` under Trainer), so gradient accumulation and several processes give
          the gradients of one big batch.
        * ``forward`` accepts two extra keyword arguments: ``bos_positions`` (int or ``(B,)`` tensor, e.g. for
          multimodal ``inputs_embeds`` where BOS is not at a known token id) and ``decorrelation_mask`` (bool
          ``(B, T)``: the tokens to compare with BOS, replacing ``config.tokens``).
        * Packed rows (``position_ids`` restarting, no ``attention_mask``: TRL's ``packing=True``) are split into
          their sequences as transformers' attention splits them, and each is one sequence of the loss
          (``peft_gnnmoe.utils.packing``).

    Outputs: ``out.loss`` is the total; ``out.ce_loss`` and ``out.decorrelation_loss`` hold the parts, as fields of
    the output (they survive accelerate's mixed-precision output conversion and DDP)
    (``out.loss = out.ce_loss + weight * out.decorrelation_loss``; also on ``model.last_loss_parts``, detached, with
    the per-layer and per-sequence values, from the latest call). An output without a loss (no labels, or labels
    removed by Trainer's label smoothing / ``compute_loss_func``) gets only the parts, with a warning, as does a batch
    in which no sequence has a selected token.

    Example:
        ```py
        >>> import torch, peft_gnnmoe
        >>> from peft import LoraConfig, get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        >>> llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, bos_token_id=1, **tiny))
        >>> config = peft_gnnmoe.SinkDecorrelationConfig(base_config=LoraConfig(target_modules=["q_proj", "v_proj"]))
        >>> model = get_peft_model(llm, config).train()
        >>> ids = torch.tensor([[1, 5, 9, 12, 7], [1, 8, 3, 0, 0]])  # BOS (id 1) first, the second row right-padded
        >>> mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
        >>> labels = ids.masked_fill(mask == 0, -100)
        >>> out = model(input_ids=ids, attention_mask=mask, labels=labels)
        >>> parts = out.loss, out.ce_loss, out.decorrelation_loss  # loss = ce_loss + 0.1 * decorrelation_loss
        ```
    """

    prefix: str = "sink_decorrelation_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    # ---- injection -------------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: SinkDecorrelationConfig, adapter_name: str) -> None:
        if "_model_hooks" not in self.__dict__:
            self._model_hooks: list[RemovableHandle] = []
            self._calls = CallRegistry()
            self._layer_paths: dict[str, str] = {}
            self._loss_enabled = True
            self._collector: list[tuple[torch.Tensor, torch.Tensor]] | None = None
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
            inner = inject_inner_adapter(config.base_config, model, adapter_name, low_cpu_mem_usage, state_dict)
            self.targeted_module_names.extend(n for n in inner if n not in self.targeted_module_names)
        elif not had_adapters:
            for param in model.parameters():
                param.requires_grad_(False)
            if not config.inference_mode:
                warnings.warn(
                    "SinkDecorrelationConfig(base_config=None) injects no adapter and freezes the model: it has no "
                    "trainable parameter, so training changes nothing and the wrapper only computes the loss. Leave "
                    "base_config at its default (PEFT's default LoraConfig()) or pass one, e.g. "
                    "base_config=LoraConfig(r=16, target_modules=['q_proj', 'v_proj']), to train an adapter.",
                    UserWarning,
                    stacklevel=2,
                )
        # the inner tuner activated the new adapter; restore the active one(s), as peft does when adding an adapter
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _post_injection_hook(self, model: nn.Module, config: SinkDecorrelationConfig, adapter_name: str) -> None:
        if not self._model_hooks:
            self._model_hooks = install_model_hooks(model, self._before_forward, self._after_forward)

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
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []
        self._calls.finish_all()

    @contextlib.contextmanager
    def collect_loss_terms(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Within the block, every training call hands its term to the caller instead of adding it to the model's
        loss: the yielded list gets ``(weight * L_decor, L_decor's mean over the call's sequences)`` per call with
        gradients. For trainers that compute the loss themselves (TRL's fused LM head, see ``peft_gnnmoe.trl``)."""
        previous, self._collector = self._collector, []
        try:
            yield self._collector
        finally:
            self._collector = previous

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
        self._calls.finish()  # a call of this thread that never reached the post-hook
        active = self._active_config()
        if active is None or not (module.training and self._loss_enabled and active[1].weight > 0):
            return args, kwargs
        adapter_name, config = active
        inputs = forward_arguments(module, args, kwargs)
        if inputs.get("fused_lm_head") and torch.is_grad_enabled() and self._collector is None:
            raise ValueError(
                "this training call asks for TRL's fused LM head (fused_lm_head=True): TRL's trainers then compute "
                "the loss from the per-token log-probabilities and never read the model's loss, so the "
                "decorrelation term would be dropped without a word. Train with `from peft_gnnmoe.trl import "
                "SFTTrainer`, a drop-in subclass of trl.SFTTrainer that adds the term."
            )
        if any(inputs.get(name) is not None for name in CACHE_ARGS):
            # a decoding step (generate) or a continuation of a cached sequence: no loss
            if inputs.get("labels") is not None:
                warn_once(
                    self,
                    "cache",
                    "a training call with labels and a KV cache (cache= / past_key_values=) is treated as a decoding "
                    "step: the decorrelation term is not added. Call the model without a cache to train with it.",
                )
            return args, kwargs

        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("the decorrelation loss needs input_ids or inputs_embeds.")
        batch_size, seq_len = reference.shape[:2]
        attention_mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        valid = valid_token_mask(attention_mask, batch_size, seq_len, reference.device)
        context = loss_context(module, args, kwargs, named=inputs)
        # transformers keeps packed sequences apart when position_ids restart and no attention_mask is given
        packed = packed_layout(inputs.get("position_ids"), batch_size, seq_len) if attention_mask is None else None
        if packed is None:
            if attention_mask is None and any(inputs.get(name) is not None for name in PACKING_ARGS):
                raise ValueError(
                    "this call has packed-sequence arguments (cu_seq_lens_* / seq_idx) but no position_ids that "
                    "restart at each sequence, so the decorrelation loss cannot tell the packed sequences apart: pass "
                    "position_ids (TRL's and transformers' padding-free collators do)."
                )
            bos_positions = find_bos_positions(
                valid,
                input_ids,
                bos_token_id(module, config.bos_token_id),
                config.bos,
                bos_positions=extra.get("bos_positions"),
            )
            token_mask = decorrelation_token_mask(
                valid, bos_positions, config.tokens, labels, extra.get("decorrelation_mask")
            )
        else:
            bos_positions, token_mask, context = self._packed_selection(
                module, config, packed, valid, input_ids, labels, context, extra
            )
        if not bool(token_mask.any()):
            warn_once(
                self,
                "empty_selection",
                f"the decorrelation loss selects no token in any sequence of this batch (tokens={config.tokens!r}), "
                "so it adds 0. With tokens='prefix'/'reference' the labels must be -100 on the prompt tokens "
                "(DataCollatorForLanguageModeling sets -100 only on padding); use tokens='all' or pass "
                "decorrelation_mask=.",
            )
        layers = module.get_submodule(self._layer_paths[adapter_name])
        indices = resolve_layer_indices(config.layers, len(layers))
        check_gradient_checkpointing(layers, indices)
        call = SinkCall(config, indices, bos_positions, token_mask, context, packed)
        self._calls.start(call, layers)
        return args, kwargs

    def _packed_selection(
        self,
        module: nn.Module,
        config: SinkDecorrelationConfig,
        packed: PackedLayout,
        valid: torch.Tensor,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        context: LossContext,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, LossContext]:
        """BOS and selected tokens of packed rows, found on the unpacked view (one row per sequence, as in a padded
        batch); returns each token's own BOS position in its row, the packed token mask and the loss context with
        unpacked labels (so that every packed sequence is weighted as the model's loss weights it)."""
        if extra.get("bos_positions") is not None:
            raise ValueError(
                "bos_positions= gives one BOS per row, but these rows hold packed sequences (position_ids restart): "
                "pass a decorrelation_mask= or use SinkDecorrelationConfig(bos='first') (each packed sequence's "
                "first token)."
            )
        # a one-token sequence has nothing to compare with its BOS (padding-free collators pad with position 0)
        unpacked_valid = packed.unpack(valid, False) & (packed.lengths > 1)[:, None]
        unpacked_ids = None if input_ids is None else packed.unpack(input_ids, -1)
        unpacked_labels = None if labels is None else packed.unpack(labels, -100)
        unpacked_mask = extra.get("decorrelation_mask")
        if unpacked_mask is not None:
            if unpacked_mask.shape != valid.shape:
                raise ValueError(
                    f"decorrelation_mask has shape {tuple(unpacked_mask.shape)}, expected {tuple(valid.shape)}."
                )
            unpacked_mask = packed.unpack(unpacked_mask.bool(), False)
        bos = find_bos_positions(unpacked_valid, unpacked_ids, bos_token_id(module, config.bos_token_id), config.bos)
        token_mask = decorrelation_token_mask(unpacked_valid, bos, config.tokens, unpacked_labels, unpacked_mask)
        shift_labels = context.shift_labels
        context = dataclasses.replace(
            context,
            labels=unpacked_labels,
            shift_labels=None if shift_labels is None else packed.unpack(shift_labels, -100),
        )
        return packed.start + bos[packed.sequence], packed.pack(token_mask), context

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self._calls.finish()
        if call is None or output is None:
            return None
        missing = sorted(set(call.indices) - set(call.layer_sums))
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in this forward; cannot compute their loss.")
        config = call.config
        counts = call.counts
        layer_sums = [call.layer_sums[i] for i in call.indices]
        if config.reduction == "sample":
            per_sample = reduce_layer_sums(layer_sums, counts, "sample")
            weights = sample_weights(call.context, module, per_sample.shape[0], per_sample.device)
            decor = (weights * per_sample).sum()
            call_mean = decor.detach() / weights.sum().clamp_min(1e-12)  # as if the call were the whole batch
            per_layer = [(weights * s.to(counts.device) / counts.clamp_min(1)).sum() for s in layer_sums]
        else:
            if call.context.num_items_in_batch is not None:
                warn_once(
                    self,
                    "tokens_reduction",
                    "reduction='tokens' (the reference code's mean over the micro-batch's tokens) is added at full "
                    "weight to every micro-batch: under gradient accumulation or several processes its weight "
                    "changes with their number. Use reduction='sample' for gradients independent of them.",
                )
            per_sample = None
            decor = reduce_layer_sums(layer_sums, counts, "tokens")
            call_mean = decor.detach()
            per_layer = [reduce_layer_sums([s], counts, "tokens") for s in layer_sums]

        ce = _loss_of(output)
        if ce is not None:
            decor = decor.to(ce.device)  # the loss may live on another device than the inputs (device_map="auto")
        if self._collector is not None:  # the trainer adds the term to the loss it computes
            if torch.is_grad_enabled():
                self._collector.append((config.weight * decor, call_mean))
            added = False
        else:
            output, added = add_to_loss(output, config.weight * decor)
        if not added and self._collector is None:
            warn_once(
                self,
                "no_loss",
                "the model output has no loss (no labels, or Trainer removed them for label smoothing or "
                "compute_loss_func), so the decorrelation term was not added to any loss. Add "
                "`weight * out.decorrelation_loss` to your loss yourself, or pass labels.",
            )
        total = _loss_of(output) if added else None
        self.last_loss_parts = {
            "loss": None if total is None else total.detach(),
            "ce_loss": None if ce is None else ce.detach(),
            "decorrelation_loss": decor.detach(),
            "weight": config.weight,
            "per_layer": {i: v.detach() for i, v in zip(call.indices, per_layer)},
            "per_sample": None if per_sample is None else per_sample.detach(),
        }
        return _with_parts(output, ce_loss=ce, decorrelation_loss=decor)


def _with_parts(output: Any, ce_loss: torch.Tensor | None, decorrelation_loss: torch.Tensor) -> Any:
    """The output with the loss parts as fields. A ``ModelOutput`` becomes an instance of a subclass of its own class
    with two more fields, so that the parts survive every rebuild of the output from its fields (accelerate's float32
    conversion under mixed precision, DDP's pytree round trip); the model's own fields keep their positions."""
    if isinstance(output, ModelOutput) and dataclasses.is_dataclass(output):
        return _output_class_with_parts(type(output))(**output, ce_loss=ce_loss, decorrelation_loss=decorrelation_loss)
    if not isinstance(output, tuple):
        output.ce_loss, output.decorrelation_loss = ce_loss, decorrelation_loss
    return output


@functools.cache
def _output_class_with_parts(cls: type) -> type:
    if {f.name for f in dataclasses.fields(cls)} >= {"ce_loss", "decorrelation_loss"}:
        return cls  # the output of a call already wrapped (nested sink-decorrelation models)
    parts = [
        (name, torch.Tensor | None, dataclasses.field(default=None)) for name in ("ce_loss", "decorrelation_loss")
    ]
    return dataclasses.make_dataclass(cls.__name__, parts, bases=(cls,))


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a model output carries (``output.loss``, or a leading 0-d tensor of a tuple), or None."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
        return output[0]
    return None
