"""``peft-gnnmoe analyze --image`` on a tiny saved DINOv2 and small image files, and the patch-grid maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessor

from peft_gnnmoe.analysis import analyze
from peft_gnnmoe.analysis.vision_command import load_image
from peft_gnnmoe.analysis.vision_plots import vision_maps_figure
from peft_gnnmoe.cli import main


@pytest.fixture
def vision_dir(tmp_path, make_vit_family):
    """A tiny DINOv2 (32 px, 8 px patches) with a planted outlier (feature 5 at layer 1), saved with its processor."""
    model = make_vit_family("dinov2")
    with torch.no_grad():
        model.dinov2.encoder.layer[1].mlp.fc2.bias[5] = 4000.0
    folder = tmp_path / "tiny-dinov2"
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _run(vision_dir, image_files, out) -> dict:
    args = ["analyze", "--model", str(vision_dir), "--output-dir", str(out)]
    assert main(args + [a for path in image_files for a in ("--image", path)]) == 0
    return json.loads((out / "report.json").read_text())


def test_cli_on_images_writes_one_map_per_image(vision_dir, image_files, tmp_path):
    _run(vision_dir, image_files, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("vision_maps_*.png")) == [
        "vision_maps_0.png",
        "vision_maps_1.png",
    ]


def test_cli_on_images_finds_the_planted_outlier(vision_dir, image_files, tmp_path):
    report = _run(vision_dir, image_files, tmp_path / "out")
    assert report["massive_activations"]["features"] == {"5": 2 * 17}


def test_cli_on_images_labels_the_tokens(vision_dir, image_files, tmp_path):
    report = _run(vision_dir, image_files, tmp_path / "out")
    assert report["tokens"][0][:2] == ["CLS", "p(0,0)"]


def test_images_need_a_vision_model(image_files, tmp_path, make_lm):
    text_model = tmp_path / "tiny-llama"
    make_lm("llama").save_pretrained(text_model)
    args = ["analyze", "--model", str(text_model), "--image", image_files[0], "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="cannot load a vision model and its image processor"):
        main(args)


def test_unknown_skimage_photo_is_a_clear_message():
    pytest.importorskip("skimage.data")
    with pytest.raises(SystemExit, match="no sample image"):
        load_image("skimage:not_a_photo")


def test_grey_photo_becomes_rgb():
    pytest.importorskip("skimage.data")
    assert load_image("skimage:camera").shape[-1] == 3


def test_maps_show_every_layer_of_a_shallow_model(make_vit, images):
    report = analyze(make_vit(), {"pixel_values": images})
    figure = vision_maps_figure(report, (4, 4))
    assert len([ax for ax in figure.axes if ax.get_images()]) == 3 * 2  # norm, attention, cosine x layers 0, 1


def test_map_titles_give_the_cls_value(make_vit, images):
    report = analyze(make_vit(), {"pixel_values": images})
    figure = vision_maps_figure(report, (4, 4))
    norms = [report["massive_activations"]["layers"][at]["norms"][0][0] for at in (0, 1)]
    assert [ax.get_title() for ax in figure.axes[:2]] == [f"layer {at}\nCLS {n:.3g}" for at, n in zip((0, 1), norms)]


def test_summary_mentions_the_maps(vision_dir, image_files, tmp_path, capsys):
    _run(vision_dir, image_files, tmp_path / "out")
    assert "2 patch-grid maps" in capsys.readouterr().out
