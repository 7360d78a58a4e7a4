"""Fixtures the DG recipe's tests share."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image


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


@pytest.fixture(scope="session")
def tiny_domain_sizes() -> dict[str, int]:
    """The images per domain of ``tiny``: odd sizes, so 2 processes get uneven shards."""
    return {"dom_a": 13, "dom_b": 15, "dom_c": 17}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_domain_sizes):
    """A 3-domain, 2-class image folder (``data/``) and a random-init tiny ViT saved like a Hub checkpoint
    (``vit/``): a sweep on them takes seconds."""
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("dg")
    rng = np.random.default_rng(0)
    for d, (dom, n) in enumerate(tiny_domain_sizes.items()):
        for i in range(n):
            cls = ["circle", "square"][i % 2]
            img = np.full((20, 20, 3), 40 * d, dtype=np.uint8)
            if cls == "square":
                img[5:15, 5:15] = 220
            else:
                yy, xx = np.mgrid[:20, :20]
                img[(yy - 10) ** 2 + (xx - 10) ** 2 < 30] = 220
            img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
            os.makedirs(root / "data" / dom / cls, exist_ok=True)
            Image.fromarray(img).save(root / "data" / dom / cls / f"{i}.png")
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root / "vit")
    with open(root / "vit" / "preprocessor_config.json", "w") as f:
        json.dump(
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 16, "width": 16},
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            },
            f,
        )
    return root


@pytest.fixture(scope="session")
def tiny_args(tiny):
    """``tiny_args(out, *extra)``: the command line of a sweep on ``tiny`` into ``out`` (batches of 4, no tracker),
    followed by ``extra``."""

    def args(out, *extra: str) -> list[str]:
        data = ["--dataset", "Tiny", "--data_dir", str(tiny / "data"), "--backbone", str(tiny / "vit")]
        batches = ["--cache_dir", str(tiny / "hf_cache"), "--eval_batch_size", "4", "--batch_size", "4"]
        return [*data, *batches, "--output_dir", str(out), "--report_to", "none", *extra]

    return args
