"""Per-method learning rates (``--method_lr``) and how they combine with ``--lr`` and the real tier's preset."""

import json

import pytest

from recipes.dg import methods, train


def test_method_lr_sets_only_the_named_methods():
    cfg = train.parse_args(["--method_lr", "lora=5e-4"])
    assert cfg.training.method_lr == {"lora": 5e-4}
    assert cfg.training.lr is None


def test_explicit_method_lr_entries_win_over_the_tier_and_keep_its_others():
    tier = train.TIERS["real"]["method_lr"]
    other = next(name for name in tier if name != "gnnmoe")
    cfg = train.parse_args(["--tier", "real", "--method_lr", "gnnmoe=1e-4"])
    assert cfg.training.method_lr["gnnmoe"] == 1e-4
    assert cfg.training.method_lr[other] == tier[other]


@pytest.mark.parametrize("entry", ["nomethod=1e-3", "lora", "lora=fast"])
def test_bad_method_lr_entries_are_refused(entry, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--method_lr", entry])
    assert "--method_lr" in capsys.readouterr().err


def _run_lrs(out) -> dict[str, float]:
    lrs = {}
    for path in (out / "runs").glob("*/*/result.json"):
        result = json.loads(path.read_text())
        lrs[result["method"]] = result["lr"]
    return lrs


@pytest.mark.slow
def test_the_sweep_trains_each_method_at_its_learning_rate(tmp_path):
    out = tmp_path / "dry"
    train.main(
        ["--dry_run", "--method", "lora", "probe", "--method_lr", "lora=5e-4", "--output_dir", str(out)]
        + ["--routing_images", "0"]  # with TensorBoard's hparams (when installed), which take no dicts
    )
    assert _run_lrs(out) == {"lora": 5e-4, "probe": methods.DEFAULT_LR["probe"]}


@pytest.mark.slow
def test_lr_overrides_every_method_lr(tmp_path):
    out = tmp_path / "dry"
    train.main(
        ["--dry_run", "--method", "lora", "probe", "--method_lr", "lora=5e-4", "--lr", "2e-4"]
        + ["--output_dir", str(out), "--report_to", "none", "--routing_images", "0"]
    )
    assert _run_lrs(out) == {"lora": 2e-4, "probe": 2e-4}
