"""Cosine similarity of every token's residual stream to the BOS token's, per decoder layer.

Intermediate attention sinks have hidden states close to BOS's (arXiv 2510.22603); this is the quantity the
decorrelation loss pushes down. For an image batch (``pixel_values``) the reference token is the CLS token at
position 0 (a model without CLS, like SigLIP, gets a warning: position 0 is then the top-left patch).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from ..tuners.sink_decorrelation.loss import cosine_to_bos, decorrelation_token_mask, find_bos_positions
from ..utils.model_introspection import LayerSpec, find_decoder_layers, resolve_layer_indices
from ._inputs import Batch, as_batch, bos_positions_for, inference, is_causal, to_list, valid_mask
from .vision import is_vision_batch, num_prefix_tokens


@dataclass
class BosCosineReport:
    """Result of [`bos_cosine_similarity`][peft_gnnmoe.analysis.bos_cosine_similarity] (``to_dict()``: JSON-ready).

    ``cosine[b][i][t]`` is the similarity at layer ``layers[i]`` (None at padding); ``mean_per_layer[i]`` the mean
    over valid non-BOS tokens of the batch and ``mean`` its average over the layers; ``mean_abs*`` the same for
    ``|cos|`` (what the decorrelation loss drives to 0, whatever the sign).
    """

    layers: list[int]
    bos_positions: list[int]
    cosine: list
    mean_per_layer: list[float]
    mean: float
    mean_abs_per_layer: list[float]
    mean_abs: float
    causal: bool | None = None  # decoder (True), encoder (False), unknown (None): names the layers in the plots

    def to_dict(self) -> dict:
        return asdict(self)


def bos_cosine_similarity(
    model: nn.Module,
    batch: Batch,
    layers: LayerSpec = "all",
    bos: Literal["first", "token"] = "first",
    bos_positions: int | torch.Tensor | None = None,
    layers_module: str | None = None,
) -> BosCosineReport:
    """Cosine of each token to BOS at the chosen decoder layers' outputs, captured with forward hooks.

    Args:
        model: a transformers model (or a ``PeftModel`` around one), text or vision.
        batch: forward kwargs (text, or an image model's ``pixel_values``) or an id tensor.
        layers: ``"all"``, ``"all_but_last"`` or a list of layer indices.
        bos: ``"first"`` (first valid position, default; the CLS token of images) or ``"token"`` (the model's
            ``bos_token_id``; text only).
        bos_positions: explicit BOS index per sequence (overrides ``bos``).
        layers_module: path of the decoder layers if not found automatically.
    """
    batch = as_batch(batch)
    vision = is_vision_batch(batch)
    if vision and bos == "token":
        raise ValueError("bos='token' needs input_ids; an image batch's reference is the CLS token: use bos='first'.")
    with inference(model) as base:
        if vision:  # CLS first; checked against the sequence length after the forward
            size = batch["pixel_values"].shape[0]
            positions = torch.as_tensor(0 if bos_positions is None else bos_positions, dtype=torch.long)
            positions = positions.expand(size) if positions.dim() == 0 else positions
        else:
            positions = bos_positions_for(base, batch, bos, bos_positions)
        _, stack = find_decoder_layers(base, layers_module)
        indices = resolve_layer_indices(layers, len(stack))
        captured: dict[int, torch.Tensor] = {}

        def hook(index: int, module, args, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if vision and not captured:  # the image sequence's length is known from here on: range check
                find_bos_positions(valid_mask(batch, hidden.shape[1]), bos_positions=positions.to(hidden.device))
            captured[index] = cosine_to_bos(hidden, positions.to(hidden.device))

        handles = [stack[i].register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i in indices]
        try:
            base(**batch)
        finally:
            for handle in handles:
                handle.remove()

    cosine = torch.stack([captured[i].cpu() for i in indices], dim=1)  # B, L, T
    if vision:
        valid = valid_mask(batch, cosine.shape[-1]).cpu()
        if bos_positions is None and num_prefix_tokens(base, batch["pixel_values"], cosine.shape[-1]) == 0:
            warnings.warn(
                f"{type(base).__name__} has no CLS token: the reference token (position 0) is the top-left patch. "
                "Pass bos_positions= to compare with another token.",
                UserWarning,
                stacklevel=2,
            )
    else:
        valid = valid_mask(batch)
    tokens = decorrelation_token_mask(valid, positions).cpu()  # valid and not BOS
    weights = tokens[:, None].float()
    count = weights.sum(dim=(0, 2)).clamp_min(1.0)
    mean_per_layer = (cosine * weights).sum(dim=(0, 2)) / count
    mean_abs_per_layer = (cosine.abs() * weights).sum(dim=(0, 2)) / count
    cosine_list = to_list(cosine, 4)
    for b, row in enumerate(valid.cpu().tolist()):  # padding -> None
        for per_layer in cosine_list[b]:
            for t, is_valid in enumerate(row):
                if not is_valid:
                    per_layer[t] = None
    causal = None
    with contextlib.suppress(ValueError):  # unknown attention kind: the plots say "layer"
        causal = is_causal(model)
    return BosCosineReport(
        causal=causal,
        layers=indices,
        bos_positions=positions.cpu().tolist(),
        cosine=cosine_list,
        mean_per_layer=[round(v, 5) for v in mean_per_layer.tolist()],
        mean=round(mean_per_layer.mean().item(), 5),
        mean_abs_per_layer=[round(v, 5) for v in mean_abs_per_layer.tolist()],
        mean_abs=round(mean_abs_per_layer.mean().item(), 5),
    )
