"""Shared fixtures: tiny random-init transformers models built from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

# tiny ViT-family configs: 32x32 images, 8x8 patches -> a 4x4 patch grid
_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)

VIT_FAMILY = {
    # name: (config class, model class, expected special tokens in front of the 16 patches)
    "vit": (T.ViTConfig, T.ViTForImageClassification, 1),
    "deit": (T.DeiTConfig, T.DeiTForImageClassification, 2),
    "dinov2": (T.Dinov2Config, T.Dinov2ForImageClassification, 1),
    "dinov2_with_registers": (T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersForImageClassification, 5),
    "beit": (T.BeitConfig, T.BeitForImageClassification, 1),
    "clip_vision": (T.CLIPVisionConfig, T.CLIPVisionModel, 1),
    "siglip_vision": (T.SiglipVisionConfig, T.SiglipVisionModel, 0),
}


def make_vit_family(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, _ = VIT_FAMILY[name]
    kwargs = dict(_TINY, **overrides)
    if name == "dinov2_with_registers":
        kwargs.setdefault("num_register_tokens", 4)
    if model_cls.__name__.endswith("ForImageClassification"):
        kwargs.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def make_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    return make_vit_family("vit", seed=seed, **overrides)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 2])
