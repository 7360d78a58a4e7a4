"""The CE-per-step plot of several runs' train logs."""

import json

import pytest

from recipes.avsr.reports.loss_plot import ce_per_step, main, running_mean


def _log(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_the_ce_is_the_logged_part_when_the_loss_has_parts_and_the_loss_otherwise(tmp_path):
    parts = _log(tmp_path / "a.json", [{"step": 1, "loss": 5.0, "ce": 3.0, "ctc": 4.0}, {"step": 1, "val_loss": 2.0}])
    plain = _log(tmp_path / "b.json", [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.0}])
    assert ce_per_step(parts) == ([1], [3.0])  # validation rows skipped
    assert ce_per_step(plain) == ([1, 2], [3.5, 3.0])
    with pytest.raises(ValueError, match="no training step"):
        ce_per_step(_log(tmp_path / "c.json", [{"step": 1, "val_loss": 2.0}]))


def test_running_mean():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 5) == [2.0, 3.0]
    with pytest.raises(ValueError, match="window"):
        running_mean([1.0], 0)


def test_the_command_writes_the_plot_and_refuses_a_curve_without_a_label(tmp_path):
    log = _log(tmp_path / "a.json", [{"step": s, "loss": 4.0 - s / 10} for s in range(1, 30)])
    out = main([f"run a={log}", f"run b={log}", "--out", str(tmp_path / "ce.png")])
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main([str(log), "--out", str(tmp_path / "x.png")])
