"""Facts about ViT-family architectures in transformers, looked up in one place.

Default target modules, the number of special tokens in front of the patch tokens (CLS, distillation, registers),
the patch grid and whether the patches are in grid order are all derived from the model's config here, and nowhere
else.
"""

from __future__ import annotations

from typing import Any

import torch

# q/k/v of every encoder block; transformers 5 names them q_proj/k_proj/v_proj, 4.x named them query/key/value.
_QKV = ["q_proj", "k_proj", "v_proj", "query", "key", "value"]
QKV_NAME_GROUPS: tuple[tuple[str, ...], ...] = (tuple(_QKV[:3]), tuple(_QKV[3:]))  # (transformers 5, 4.x)
# composite image-text models also have a text tower with q/k/v: restrict the defaults to the vision tower
_VISION_TOWER_QKV = r".*vision_model.*\.(q_proj|k_proj|v_proj)"

VIT_FAMILY_TARGET_MODULES: dict[str, Any] = {
    "vit": _QKV,
    "deit": _QKV,
    "beit": _QKV,
    "data2vec-vision": _QKV,
    "dinov2": _QKV,
    "dinov2_with_registers": _QKV,
    "vit_msn": _QKV,
    "vit_mae": _QKV,
    "ijepa": _QKV,
    "clip_vision_model": _QKV,
    "siglip_vision_model": _QKV,
    "siglip2_vision_model": _QKV,
    "clip": _VISION_TOWER_QKV,
    "siglip": _VISION_TOWER_QKV,
    "siglip2": _VISION_TOWER_QKV,
}

# Layers whose inputs are the same tensor, so that one router (and one routing decision) can serve them.
DEFAULT_SHARED_ROUTER_GROUPS: list[list[str]] = [["q_proj", "k_proj", "v_proj"], ["query", "key", "value"]]


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def num_prefix_tokens_from_config(config: Any) -> int:
    """Special tokens before the patch tokens: CLS (+ distillation token for DeiT, + registers for DINOv2-reg)."""
    vision = _vision_config(config)
    model_type = getattr(vision, "model_type", "")
    if model_type.startswith("siglip"):
        return 0  # SigLIP pools with an attention head: no CLS token
    if model_type in VIT_FAMILY_TARGET_MODULES:
        extra = 1 if model_type == "deit" else 0
        return 1 + extra + int(getattr(vision, "num_register_tokens", 0) or 0)
    return 0


def patch_grid_from_config(config: Any) -> tuple[int, int] | None:
    """(rows, cols) of the patch grid at the config's image size, or None when the config does not say."""
    vision = _vision_config(config)
    image_size = getattr(vision, "image_size", None)
    patch_size = getattr(vision, "patch_size", None)
    if image_size is None or patch_size is None:
        return None
    image_hw = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patch_hw = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    return int(image_hw[0]) // int(patch_hw[0]), int(image_hw[1]) // int(patch_hw[1])


def patch_grid_from_pixels(config: Any, pixel_values: Any) -> tuple[int, int] | None:
    """(rows, cols) of the patch grid of one forward's ``pixel_values`` (B, C, H, W): (H // patch, W // patch).

    None when the input is not a 4-D image batch or the config names no patch size; then the config's grid is the
    hint. This is what lets a ViT run on non-square images, with ``interpolate_pos_encoding=True``, or at another size
    at evaluation than at training, without ``GNNMoEConfig(patch_grid=...)``.
    """
    if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
        return None
    patch_size = getattr(_vision_config(config), "patch_size", None)
    if patch_size is None:
        return None
    patch_hw = patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    height, width = pixel_values.shape[-2:]
    return int(height) // int(patch_hw[0]), int(width) // int(patch_hw[1])


# models whose encoder shuffles the patch tokens at random (and keeps a random subset): their order is not spatial
_SHUFFLED_PATCH_MODELS = ("vit_mae",)


def patches_in_spatial_order(config: Any, module_name: str) -> bool:
    """Whether the layer ``module_name`` sees the patch tokens in row-major grid order.

    ViT-MAE's encoder sees CLS + a random subset of the patches in random order (``random_masking`` shuffles them even
    with ``mask_ratio=0``); its decoder sees CLS + all patches restored to grid order.
    """
    model_type = getattr(_vision_config(config), "model_type", "")
    if model_type in _SHUFFLED_PATCH_MODELS:
        return ".decoder." in f".{module_name}."
    return True
