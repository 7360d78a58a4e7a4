"""The DG recipe on a data folder with unreadable images: it stops before training by default, and with
``--skip_bad_images`` trains without them and records them in results.json and results.md; a resume checks the
folder again and refuses one whose readable images changed."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from recipes.dg import train
from recipes.dg.data import BadImagesError

BAD = {"dom_a/circle/2.jpg": "zero bytes", "dom_b/square/1.jpg": "truncated"}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A random-init 1-block ViT saved like a Hub checkpoint (16 px input)."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "size": {"height": 16, "width": 16},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture
def folder(tmp_path):
    """3 domains x 2 classes x 4 JPEGs, one of them zero bytes and one cut in half."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for dom in ("dom_a", "dom_b", "dom_c"):
        for cls in ("circle", "square"):
            os.makedirs(root / dom / cls)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / dom / cls / f"{i}.jpg")
    (root / "dom_a" / "circle" / "2.jpg").write_bytes(b"")
    raw = (root / "dom_b" / "square" / "1.jpg").read_bytes()
    (root / "dom_b" / "square" / "1.jpg").write_bytes(raw[: len(raw) // 2])
    return root


def _argv(folder, vit, out, *extra):
    return [
        "--dataset",
        "Tiny",
        "--data_dir",
        str(folder),
        "--backbone",
        str(vit),
        "--output_dir",
        str(out),
        "--method",
        "probe",
        "--max_steps",
        "2",
        "--eval_every",
        "2",
        "--seeds",
        "0",
        "--test_envs",
        "0",
        "--batch_size",
        "2",
        "--routing_images",
        "0",
        "--jobs",
        "1",
        "--report_to",
        "none",
        *extra,
    ]


def test_unreadable_images_stop_the_run_before_training(folder, tiny_vit, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(BadImagesError, match="--skip_bad_images") as err:
        train.main(_argv(folder, tiny_vit, out))
    assert [b.path for b in err.value.bad] == list(BAD)
    assert not (out / "args.json").exists()  # nothing started


@pytest.mark.slow
def test_skip_bad_images_records_them_in_results(folder, tiny_vit, tmp_path):
    out = tmp_path / "sweep"
    with pytest.warns(UserWarning, match="leaving out 2 of the 24"):
        table = train.main(_argv(folder, tiny_vit, out, "--skip_bad_images"))
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"]["count"] == 2
    assert results["skipped_images"]["files"] == list(BAD)
    assert [results["skipped_images"]["reasons"][f].split(" ")[0] for f in BAD] == ["zero", "truncated"]
    assert table["skipped_images"] == results["skipped_images"]
    report = (out / "results.md").read_text()
    assert "left out (`--skip_bad_images`): 2: `dom_a/circle/2.jpg`, `dom_b/square/1.jpg`" in report
    record = json.loads((out / "runs" / "probe" / "env0_trial0" / "result.json").read_text())["records"][-1]
    assert record["env0_in_n"] == 6  # 80% of dom_a's 7 readable images


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:--skip_bad_images")
def test_resume_checks_the_folder_again(folder, tiny_vit, tmp_path):
    out = tmp_path / "sweep"
    argv = _argv(folder, tiny_vit, out, "--skip_bad_images")
    table = train.main(argv)
    again = train.main(argv + ["--resume_from_checkpoint"])  # the same files are skipped: same images
    assert again["methods"] == table["methods"]
    Image.new("RGB", (20, 24)).save(folder / "dom_a" / "circle" / "2.jpg")  # repaired: one more image
    with pytest.raises(ValueError, match="'images'.*splits would differ"):
        train.main(argv + ["--resume_from_checkpoint"])
