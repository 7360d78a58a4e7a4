"""Vision transformers (ViT, DeiT, DINOv2, BEiT, CLIP/SigLIP vision) in the analyses: ``pixel_values`` batches.

The token sequence of a ViT is its prefix tokens (CLS first, then DeiT's distillation token or DINOv2's registers),
then the patches in row-major order. The analyses take the CLS token (position 0) as the "BOS" of text models: it is
the token every other one can attend to and the usual attention sink of ViTs. All attention is bidirectional.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils.model_introspection import unwrap_model


def is_vision_batch(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` holds images (``pixel_values``) and no text (``input_ids`` / ``inputs_embeds``)."""
    no_text = batch.get("input_ids") is None and batch.get("inputs_embeds") is None
    return no_text and batch.get("pixel_values") is not None


def patch_grid(model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid the model cuts ``pixel_values`` (``B, C, H, W``) into."""
    config = getattr(unwrap_model(model), "config", None)
    patch = getattr(config, "patch_size", None)
    if patch is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__}'s config has no patch_size: is it a vision model?")
    height, width = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return pixel_values.shape[-2] // height, pixel_values.shape[-1] // width


def num_prefix_tokens(model: nn.Module, pixel_values: torch.Tensor, num_tokens: int) -> int:
    """Tokens before the patches in a sequence of ``num_tokens``: CLS, distillation token, registers (0 for SigLIP)."""
    rows, cols = patch_grid(model, pixel_values)
    prefix = num_tokens - rows * cols
    if prefix < 0:
        raise ValueError(
            f"{num_tokens} tokens cannot hold a {rows}x{cols} patch grid: the model does not put one token per patch."
        )
    return prefix


def vision_token_labels(model: nn.Module, pixel_values: torch.Tensor, num_tokens: int) -> list[str]:
    """Readable names of the ``num_tokens`` positions: ``"CLS"``, ``"dist"`` (DeiT), ``"reg0"``.., ``"p(r,c)"``."""
    prefix = num_prefix_tokens(model, pixel_values, num_tokens)
    _, cols = patch_grid(model, pixel_values)
    model_type = str(getattr(getattr(unwrap_model(model), "config", None), "model_type", ""))
    names = ["CLS"][:prefix]
    if model_type.startswith("deit") and prefix == 2:
        names.append("dist")
    names += [f"reg{i}" for i in range(prefix - len(names))]
    return names + [f"p({i // cols},{i % cols})" for i in range(num_tokens - prefix)]
