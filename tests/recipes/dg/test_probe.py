"""The linear probe of a frozen backbone per (input size, blocks): the real tier's resolution and depth cost."""

import json

import numpy as np
import pytest

from recipes.dg import probe


def _one_hot_features(labels, noise, rng):
    return np.eye(10)[labels] + noise * rng.standard_normal((len(labels), 10))


def test_probe_scores_the_held_out_domain_with_features_of_the_training_domains():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 10, 200) for _ in range(4)]
    informative = [_one_hot_features(y, 0.1, rng) for y in labels]
    result = probe.probe(informative, labels, test_env=2, trial=0, holdout=0.2)
    assert result["val_acc"] == 1.0 and result["test_acc"] == 1.0 and result["C"] in probe.REGULARISATION
    # the held-out domain's features carry no label: its accuracy falls to chance while validation stays perfect
    shuffled = [f if i != 2 else f[rng.permutation(len(f))] for i, f in enumerate(informative)]
    result = probe.probe(shuffled, labels, test_env=2, trial=0, holdout=0.2)
    assert result["val_acc"] == 1.0 and result["test_acc"] < 0.3


@pytest.mark.slow
def test_probe_command_writes_one_cell_per_size_and_block_count(tiny_dinov2, tmp_path):
    cells = probe.main(["--backbone", str(tiny_dinov2), "--sizes", "14", "28", "--num_blocks", "1", "3",
                        "--seeds", "0", "--images_per_domain", "100", "--output", str(tmp_path)])  # fmt: skip
    assert [(c["image_size"], c["num_blocks"], c["grid"]) for c in cells] == [(14, 1, 2), (14, 3, 2), (28, 1, 4),
                                                                              (28, 3, 4)]  # fmt: skip
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(cells))
    for cell in cells:
        assert [(r["test_env"], r["trial"]) for r in cell["runs"]] == [(e, 0) for e in range(4)]
        assert cell["summary"]["val"]["mean"] > 20  # random features of real digits: well above chance (10 %)
        assert all(0 <= v["mean"] <= 100 for v in cell["summary"]["per_domain"].values())
    assert cells[0]["summary"] != cells[1]["summary"]  # the block count changes the features
    assert (tmp_path / "probe.md").read_text().count("\n| ") == 4  # one row per cell
    assert (tmp_path / "probe.png").stat().st_size > 0


def test_probe_runs_a_vit_at_another_input_size(tmp_path):
    """A ViT checkpoint (28 px) probed at 14 px: its position embeddings are interpolated, as DINOv2's always are."""
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    cells = probe.main(["--backbone", str(tmp_path / "vit"), "--sizes", "14", "--num_blocks", "1",
                        "--seeds", "0", "--images_per_domain", "100", "--output", str(tmp_path / "out")])  # fmt: skip
    assert cells[0]["grid"] == 2 and cells[0]["summary"]["val"]["mean"] > 15


def test_trial_seeds_is_a_deprecated_alias_of_seeds():
    with pytest.warns(FutureWarning, match="--trial_seeds is deprecated .*use --seeds"):
        args = probe.build_parser().parse_args(["--trial_seeds", "3", "--output", "out"])
    assert args.seeds == [3]


def test_images_per_domain_draws_a_fixed_subset_in_order():
    import torch

    from recipes.dg.data import TensorDomain

    domain = TensorDomain(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 1, 1), torch.arange(10))
    small = probe.subsample(domain, 4)
    assert len(small) == 4 and small.labels.tolist() == sorted(small.labels.tolist())
    assert torch.equal(small.images[:, 0, 0, 0].long(), small.labels)  # images stay with their labels
    assert probe.subsample(domain, 4).labels.tolist() == small.labels.tolist()  # the same subset every time
    assert probe.subsample(domain, None) is domain and probe.subsample(domain, 99) is domain
