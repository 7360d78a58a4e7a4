"""plot_expert_assignments: one row per image, an input panel and one overlay per router, saved as a PNG."""

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image

from peft_gnnmoe import GNNMoEConfig, get_expert_assignments
from peft_gnnmoe.tuners.gnnmoe.routing_figure import plot_expert_assignments


def _routed(model, images):
    model = get_peft_model(model, GNNMoEConfig(num_experts=3, top_k=1)).eval()
    with torch.no_grad():
        model(pixel_values=images)
    return get_expert_assignments(model)


def test_figure_has_an_input_and_one_overlay_per_router_for_every_image(make_vit, tmp_path):
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assignments = _routed(make_vit(seed=0), pixels.float() / 255)
    assert len(assignments) == 2  # one shared q/k/v router per block of the 2-block ViT
    path = tmp_path / "figures" / "routing.png"
    fig = plot_expert_assignments(pixels, assignments, path, title="tiny ViT")
    axes = fig.axes
    assert len(axes) == 3 * (1 + 2)
    inputs, overlays = axes[0::3], [ax for i, ax in enumerate(axes) if i % 3]
    for ax in inputs:
        assert len(ax.get_images()) == 1
    for ax in overlays:
        assert len(ax.get_images()) == 2  # the image, then its patch grid coloured by expert
    assert [ax.get_title() for ax in axes[:3]] == ["input", "layer 0", "layer 1"]
    assert fig.get_suptitle() == "tiny ViT"
    np.testing.assert_allclose(axes[0].get_images()[0].get_array(), pixels[0].permute(1, 2, 0).numpy() / 255)
    assert len(fig.legends[0].get_texts()) == 1 + max(int(a["topk_index"].max()) for a in assignments.values())
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size[0] > 100


def test_each_overlay_is_the_top1_expert_of_the_patches(vit_family, make_vit_family):
    """Any ViT: the special tokens (CLS, distillation, registers; none for SigLIP) are left out of the grid."""
    name, num_prefix = vit_family
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assignments = _routed(make_vit_family(name), images)
    fig = plot_expert_assignments(images, assignments)
    routers = list(assignments.values())
    for i in range(2):
        for j, assignment in enumerate(routers):
            assert assignment["num_prefix_tokens"] == num_prefix
            overlay = fig.axes[i * (len(routers) + 1) + j + 1].get_images()[1].get_array()
            want = assignment["topk_index"][i, num_prefix:, 0].reshape(4, 4).numpy()
            np.testing.assert_array_equal(np.asarray(overlay), want)


def test_patches_that_do_not_fill_the_grid_are_an_error():
    """Six patches on no known grid cannot be drawn as a square: raise instead of dropping patches."""
    assignments = {"encoder.layer.0": {"topk_index": torch.zeros(1, 7, 1, dtype=torch.long), "num_prefix_tokens": 1}}
    assignments["encoder.layer.0"]["grid"] = None
    with pytest.raises(ValueError, match="do not fill its patch grid 2x2"):
        plot_expert_assignments(torch.zeros(1, 3, 8, 8), assignments)


def test_images_of_another_batch_are_an_error():
    assignments = {"encoder.layer.0": {"topk_index": torch.zeros(2, 5, 1, dtype=torch.long), "num_prefix_tokens": 1}}
    assignments["encoder.layer.0"]["grid"] = (2, 2)
    with pytest.raises(ValueError, match="routing of 2 images but 1 images"):
        plot_expert_assignments(torch.zeros(1, 3, 8, 8), assignments)
    with pytest.raises(ValueError, match="assignments is empty"):
        plot_expert_assignments(torch.zeros(1, 3, 8, 8), {})
