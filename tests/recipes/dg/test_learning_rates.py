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


def _dry_run(tiny_args, out, *extra) -> None:
    """A dry run of LoRA and the linear probe on the tiny image folder: the rates are checked, not the data."""
    train.main(tiny_args(out, "--dry_run", "--method", "lora", "probe", "--routing_images", "0", *extra))


@pytest.mark.slow
def test_the_sweep_trains_each_method_at_its_learning_rate(tiny_args, tmp_path):
    # with TensorBoard's hparams (when installed), which take no dicts
    _dry_run(tiny_args, tmp_path / "dry", "--method_lr", "lora=5e-4", "--report_to", "tensorboard")
    assert _run_lrs(tmp_path / "dry") == {"lora": 5e-4, "probe": methods.DEFAULT_LR["probe"]}


@pytest.mark.slow
def test_lr_overrides_every_method_lr(tiny_args, tmp_path):
    _dry_run(tiny_args, tmp_path / "dry", "--method_lr", "lora=5e-4", "--lr", "2e-4")
    assert _run_lrs(tmp_path / "dry") == {"lora": 2e-4, "probe": 2e-4}
