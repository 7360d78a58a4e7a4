"""Paired differences and the last-checkpoint share of a DG sweep, against hand computations."""

import json

import pytest

from recipes.dg import paired, report


def _run(method, env, trial, acc, step=100):
    return {
        "method": method,
        "test_env": env,
        "trial": trial,
        "test_acc": acc,
        "selected_step": step,
        "trainable_params": 1,
        "total_params": 2,
        "train_seconds": 1.0,
        "records": [{"step": step, "test_acc": acc, "val_acc": acc}],
    }


RESULTS = [
    _run("gnnmoe-gcn", 0, 0, 0.50),
    _run("gnnmoe-gcn", 0, 1, 0.60, step=50),
    _run("gnnmoe-gcn", 1, 0, 0.40),
    _run("lora", 0, 0, 0.45),
    _run("lora", 0, 1, 0.62),
    _run("lora", 1, 0, 0.30),
    _run("gnnmoe-linear", 0, 0, 0.55),
]


def test_differences_are_paired_by_domain_and_trial():
    (row,) = [r for r in paired.paired_differences(RESULTS, ["gnnmoe-gcn", "lora"]) if r["minus"] == "lora"]
    diffs = [5.0, -2.0, 10.0]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3**0.5  # t(0.975, 2 degrees of freedom)
    assert row["mean"] == pytest.approx(mean)
    assert row["interval"] == pytest.approx([mean - half, mean + half])
    assert (row["wins"], row["pairs"]) == (2, 3)


def test_a_single_pair_has_no_interval():
    rows = paired.paired_differences(RESULTS, ["gnnmoe-gcn", "gnnmoe-linear"])
    (row,) = [r for r in rows if r["minus"] == "gnnmoe-linear"]
    assert row["pairs"] == 1
    assert row["interval"] is None


def test_the_token_router_is_compared_not_a_reference():
    rows = paired.paired_differences(RESULTS, ["gnnmoe-gcn", "lora", "gnnmoe-linear"])
    assert {r["method"] for r in rows} == {"gnnmoe-gcn"}
    assert {r["minus"] for r in rows} == {"lora", "gnnmoe-linear"}


def test_last_checkpoint_share_counts_runs_selected_at_the_final_step():
    share = paired.last_checkpoint_share(RESULTS, steps=100)
    assert share["gnnmoe-gcn"] == [2, 3]
    assert share["lora"] == [3, 3]


def test_report_writes_them(tmp_path):
    report.write_report(str(tmp_path), RESULTS, ["a", "b"], ["gnnmoe-gcn", "lora"], {"steps": 100, "trial_seeds": [0]})
    table = json.loads((tmp_path / "results.json").read_text())
    assert [r["minus"] for r in table["paired"]] == ["lora"]
    assert table["last_checkpoint"]["lora"] == [3, 3]
    text = (tmp_path / "results.md").read_text()
    assert "| gnnmoe-gcn | lora | +4.33 |" in text
    assert "lora 3/3" in text
