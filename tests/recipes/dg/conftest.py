"""Fixtures the DG recipe's tests share."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A random-init 3-block Dinov2Model saved like the converted preset (BitImageProcessor, centre crop 28)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(
        image_size=56,
        patch_size=7,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        mlp_ratio=2,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 28, "width": 28},
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder
