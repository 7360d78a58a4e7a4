"""Any image size: the patch grid of every forward comes from its ``pixel_values`` (issue 26, item 4).

The tiny ViT-family models are configured for 32 x 32 images with 8 x 8 patches (a 4 x 4 grid); these tests feed other
sizes, non-square ones included, with graph modes that need the grid.
"""

import inspect

import pytest
import torch
from peft import get_peft_model

from peft_gnnmoe import GNNMoEConfig, get_expert_assignments


def _grids(model) -> set[tuple[int, int] | None]:
    return {info["grid"] for info in get_expert_assignments(model).values()}


def _size_kwargs(model) -> dict:
    """``interpolate_pos_encoding=True`` where the model takes it (DINOv2 always interpolates and has no switch)."""
    forward = type(model.get_base_model()).forward
    return (
        {"interpolate_pos_encoding": True}
        if "interpolate_pos_encoding" in inspect.signature(forward).parameters
        else {}
    )


def test_non_square_images_route_on_their_own_grid(vit_family, make_vit_family):
    name, _ = vit_family
    model = get_peft_model(make_vit_family(name), GNNMoEConfig(graph="knn+grid"))
    pixels = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(0))  # 6 rows x 4 columns of patches
    out = model(pixel_values=pixels, **_size_kwargs(model))
    assert torch.isfinite(out[0] if isinstance(out, tuple) else next(iter(out.values()))).all()
    assert _grids(model) == {(6, 4)}  # rows from the height, columns from the width


def test_evaluation_at_another_size_than_training(make_vit, images, labels):
    model = get_peft_model(make_vit(), GNNMoEConfig(graph="grid8")).train()
    model(pixel_values=images, labels=labels).loss.backward()
    assert _grids(model) == {(4, 4)}
    model.eval()
    with torch.inference_mode():
        for height, width in ((64, 48), (40, 72), (32, 32)):
            logits = model(pixel_values=torch.randn(1, 3, height, width), interpolate_pos_encoding=True).logits
            assert torch.isfinite(logits).all()
            assert _grids(model) == {(height // 8, width // 8)}


def test_the_grid_of_a_non_square_input_is_its_own_not_a_square_of_the_same_size(make_vit):
    # 16 x 128 pixels = 2 x 16 patches = 32 patches; 64 x 32 pixels = 8 x 4 patches, also 32: each gets its own grid
    model = get_peft_model(make_vit(), GNNMoEConfig(graph="grid"))
    for height, width in ((16, 128), (64, 32)):
        model(pixel_values=torch.randn(1, 3, height, width), interpolate_pos_encoding=True)
        assert _grids(model) == {(height // 8, width // 8)}


def test_an_explicit_patch_grid_still_wins(make_vit, images):
    model = get_peft_model(make_vit(), GNNMoEConfig(patch_grid=[4, 4], graph="grid"))
    model(pixel_values=images)
    assert _grids(model) == {(4, 4)}
    with pytest.raises(ValueError, match=r"patch_grid=\[4, 4\]\) holds 16 patches.*24 patch tokens"):
        model(pixel_values=torch.randn(1, 3, 48, 32), interpolate_pos_encoding=True)
