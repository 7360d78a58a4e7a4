"""Routing pictures of a saved DG adapter on scikit-image photos (`python -m recipes.dg.routing_photos`)."""

import pytest
from PIL import Image

from recipes.dg import routing_photos, train
from recipes.dg.pretrain_backbone import BACKBONE_DIR


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("dg")
    train.main(
        ["--dry_run", "--method", "gnnmoe", "--save_adapters", "--output_dir", str(out)]
        + ["--report_to", "none", "--routing_images", "0"]
    )
    (model,) = (out / "runs").glob("gnnmoe-*/env0_trial0/model")
    return model


def test_photo_is_a_square_uint8_crop():
    image = routing_photos.photo("camera", 40)  # a grey-scale sample: three equal channels
    assert tuple(image.shape) == (3, 40, 40)
    assert (image[0] == image[2]).all()


@pytest.mark.slow
def test_saved_head_size_is_read_from_the_adapter(saved_adapter):
    assert routing_photos.saved_num_labels(saved_adapter) == 10


@pytest.mark.slow
def test_one_figure_per_size_at_the_photos_resolution(saved_adapter, tmp_path):
    out = tmp_path / "routing.png"
    routing_photos.main(
        [str(saved_adapter), "--backbone", str(BACKBONE_DIR), "--photos", "astronaut", "chelsea"]
        + ["--sizes", "28", "56", "--output", str(out)]
    )
    for size in (28, 56):
        with Image.open(tmp_path / f"routing_{size}px.png") as figure:
            assert figure.width > 100


def test_an_adapter_without_a_head_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.vit.encoder.layer.0.w": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no classifier head"):
        routing_photos.saved_num_labels(tmp_path)


def test_an_adapter_without_routers_is_refused(tmp_path):
    out = tmp_path / "dg"
    train.main(
        ["--dry_run", "--method", "lora", "--save_adapters", "--output_dir", str(out), "--jobs", "1"]
        + ["--report_to", "none", "--routing_images", "0"]
    )
    (model,) = (out / "runs").glob("lora/env0_trial0/model")
    with pytest.raises(ValueError, match="not a GNN-MoE adapter"):
        routing_photos.main([str(model), "--backbone", str(BACKBONE_DIR), "--photos", "camera", "--sizes", "28"])
