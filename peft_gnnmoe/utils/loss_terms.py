"""Extra loss terms (GNN-MoE's router losses, the sink decorrelation loss) normalised like the model's own loss.

A model's cross-entropy is a mean over label items. Under ``transformers.Trainer`` with gradient accumulation the
model receives ``num_items_in_batch`` (the label items of all micro-batches of the optimizer step, summed over the
processes when ``average_tokens_across_devices``) and divides the summed loss by it; Trainer then skips its own
division by the accumulation steps and multiplies by the world size, which DDP's gradient averaging undoes. An extra
term added at full weight to every micro-batch is therefore counted ``k`` times (and ``world_size`` times).

The rule here: an extra term is a per-sample tensor ``t`` (``t[b]`` depends on sample ``b`` only) and enters the
loss as ``sum_b w_b * t[b]`` with

    w_b = items_b / num_items_in_batch     when ``num_items_in_batch`` is given (Trainer with loss kwargs),
    w_b = items_b / sum_b' items_b'        when labels are given,
    w_b = 1 / B                            otherwise,

where ``items_b`` counts sample ``b``'s label items exactly as Trainer counts them (``shift_labels`` if given, else
``labels[..., 1:]`` for causal-LM losses, else ``labels``; entries ``!= -100``). The sum of ``w_b * t[b]`` over every
micro-batch and process of an optimizer step is then the same item-weighted mean of ``t`` over the whole batch, for
any number of accumulation steps and processes; with equal item counts per sample it is the plain mean over samples.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100

_SIGNATURES: dict[type, inspect.Signature] = {}
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LossContext:
    """What one model call says about its loss, read from its forward arguments."""

    labels: torch.Tensor | None
    shift_labels: torch.Tensor | None
    num_items_in_batch: torch.Tensor | int | float | None
    attention_mask: torch.Tensor | None
    training: bool


def forward_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward arguments of a call by name (``input_ids`` and others may come positionally)."""
    if not args:
        return dict(kwargs)
    signature = _SIGNATURES.get(type(model))
    if signature is None:
        signature = _SIGNATURES[type(model)] = inspect.signature(model.forward)
    return dict(signature.bind_partial(*args, **kwargs).arguments) | kwargs


def loss_context(model: nn.Module, args: tuple, kwargs: dict, named: dict[str, Any] | None = None) -> LossContext:
    """Read labels, ``shift_labels``, ``num_items_in_batch`` and the attention mask of a call (in a pre-hook).

    ``named``: the call's ``forward_arguments``, when the caller has them already (saves binding them again).
    """
    if named is None:
        named = forward_arguments(model, args, kwargs)
    nested = named.get("kwargs") if isinstance(named.get("kwargs"), dict) else {}
    get = lambda key: named.get(key, nested.get(key))  # noqa: E731
    return LossContext(
        labels=get("labels"),
        shift_labels=get("shift_labels"),
        num_items_in_batch=get("num_items_in_batch"),
        attention_mask=get("attention_mask"),
        training=model.training,
    )


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss shifts the labels (a causal-LM loss on a decoder-only model), as Trainer decides it."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - older transformers
        return False
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        loss_type = getattr(model, "loss_type", None)
    except Exception:  # loss_type is a property that may inspect the class name
        loss_type = None
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss


def items_per_sample(context: LossContext, model: nn.Module, batch_size: int) -> torch.Tensor | None:
    """Label items of every sample ``(B,)``, counted as Trainer counts ``num_items_in_batch``; None without labels."""
    if context.shift_labels is not None:
        labels = context.shift_labels
    elif context.labels is None or not torch.is_tensor(context.labels):
        return None
    elif loss_shifts_labels(model):
        labels = context.labels[..., 1:]
    else:
        labels = context.labels
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels have {labels.shape[0]} rows for a batch of {batch_size}; the extra loss term cannot weight "
            "its samples. Pass labels with one row per sample."
        )
    valid = labels.ne(IGNORE_INDEX)
    return valid.reshape(batch_size, -1).sum(dim=1).float()


def sample_weights(context: LossContext, model: nn.Module, batch_size: int, device: torch.device) -> torch.Tensor:
    """Weights ``w`` (float32, ``(B,)``): ``(w * t).sum()`` adds a per-sample term ``t`` as the model adds its loss."""
    items = items_per_sample(context, model, batch_size)
    if items is None:
        return torch.full((batch_size,), 1.0 / batch_size, device=device)
    items = items.to(device)
    if context.num_items_in_batch is not None:
        total = torch.as_tensor(context.num_items_in_batch, device=device, dtype=torch.float32).reshape(-1)[0]
    else:
        total = items.sum()
    return items / total.clamp_min(1.0)


def add_to_loss(output: Any, term: torch.Tensor) -> tuple[Any, bool]:
    """Add the scalar ``term`` to the loss of a model output; returns ``(output, added)``.

    ``output.loss`` / ``output["loss"]`` is replaced in place; a tuple whose first item is a 0-d tensor (``return_dict
    =False``) is rebuilt. When the output carries no loss (no labels, or labels popped by the caller), nothing is
    added and ``added`` is False: the caller decides whether to warn.
    """
    if isinstance(output, dict):  # ModelOutput is a dict subclass
        loss = output.get("loss")
        if loss is None:
            return output, False
        output["loss"] = loss + term.to(loss.dtype)
        return output, True
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
        return (output[0] + term.to(output[0].dtype), *output[1:]), True
    return output, False


def warn_once(owner: object, key: str, message: str) -> None:
    """A ``UserWarning`` with ``message``, at most once per ``(owner, key)``."""
    seen = _WARNED.setdefault(owner, set())
    if key in seen:
        return
    seen.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)
