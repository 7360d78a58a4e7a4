"""Shared plumbing of the analysis functions: batches, eval mode, BOS positions, causal or bidirectional attention.

A batch holds text (``input_ids`` / ``inputs_embeds``) or images (``pixel_values``, see ``vision.py``): an image
sequence's length is only known once the model has run, so its valid mask is built from the hidden states.

Model facts (unwrapping, text config, layers, BOS id) come from ``peft_gnnmoe.utils.model_introspection``, token
bookkeeping from the sink tuner's ``find_bos_positions`` / ``valid_token_mask``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..tuners.sink_decorrelation.loss import find_bos_positions, valid_token_mask
from ..utils.model_introspection import bos_token_id as model_bos_token_id
from ..utils.model_introspection import find_decoder_layers, text_config, unwrap_model
from .vision import is_vision_batch

Batch = Mapping[str, Any] | torch.Tensor


def as_batch(batch: Batch) -> dict[str, Any]:
    """A dict of forward kwargs; a bare tensor is taken as ``input_ids`` (a 1-D one as a single sequence)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    batch = dict(batch)
    if batch.get("input_ids") is None and batch.get("inputs_embeds") is None and batch.get("pixel_values") is None:
        raise ValueError("the batch needs input_ids or inputs_embeds (text) or pixel_values (images).")
    if is_vision_batch(batch) and batch.get("attention_mask") is not None:
        raise ValueError("an image batch has no padding: drop attention_mask from the pixel_values batch.")
    return batch


def batch_shape(batch: dict[str, Any]) -> tuple[int, int, torch.device]:
    reference = batch.get("input_ids") if batch.get("input_ids") is not None else batch["inputs_embeds"]
    return reference.shape[0], reference.shape[1], reference.device


def valid_mask(batch: dict[str, Any], num_tokens: int | None = None) -> torch.Tensor:
    """``(B, T)`` bool mask of non-padding tokens; an image batch needs ``num_tokens`` (every token is valid)."""
    if is_vision_batch(batch):
        if num_tokens is None:
            raise ValueError("an image batch's token count comes from the model's output: pass num_tokens.")
        pixels = batch["pixel_values"]
        return torch.ones(pixels.shape[0], num_tokens, dtype=torch.bool, device=pixels.device)
    batch_size, seq_len, device = batch_shape(batch)
    return valid_token_mask(batch.get("attention_mask"), batch_size, seq_len, device)


def is_causal(model: nn.Module, causal: bool | None = None) -> bool:
    """Whether the model's self-attention is causal (decoder) or bidirectional (encoder).

    ``causal`` overrides the detection. Otherwise the ``is_causal`` flags of the attention modules inside the layer
    stack decide (transformers sets them on every self-attention module), then ``config.is_decoder``; a model that
    shows neither, or mixes both kinds, raises ``ValueError`` asking for ``causal=``.
    """
    if causal is not None:
        return bool(causal)
    base = unwrap_model(model)
    try:
        _, stack = find_decoder_layers(base)
        modules = stack.modules()
    except ValueError:
        modules = base.modules()
    flags = {
        module.is_causal
        for module in modules
        if isinstance(getattr(module, "is_causal", None), bool) and "cross" not in type(module).__name__.lower()
    }
    if len(flags) == 1:
        return flags.pop()
    config = text_config(base)
    if not flags and isinstance(getattr(config, "is_decoder", None), bool) and config.is_decoder:
        return True
    found = "both causal and bidirectional attention modules" if flags else "no attention module with `is_causal`"
    raise ValueError(
        f"cannot tell whether {type(base).__name__} attends causally: it has {found}. Pass causal=True (decoder) or "
        "causal=False (encoder)."
    )


def bos_positions_for(
    model: nn.Module,
    batch: dict[str, Any],
    bos: Literal["first", "token"] = "first",
    bos_positions: int | torch.Tensor | None = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """BOS index per sequence (see ``find_bos_positions``); ``bos="first"`` is the analysis default."""
    bos_token_id = model_bos_token_id(model, bos_token_id) if bos == "token" else bos_token_id
    return find_bos_positions(valid_mask(batch), batch.get("input_ids"), bos_token_id, bos, bos_positions)


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Yield the transformers model in eval mode under ``torch.no_grad``; restore the training flag afterwards."""
    base = unwrap_model(model)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            yield base
    finally:
        base.train(was_training)


def to_list(tensor: torch.Tensor, digits: int = 5) -> list:
    """Nested lists of rounded floats (JSON-friendly)."""
    return torch.round(tensor.detach().float().cpu(), decimals=digits).tolist()
