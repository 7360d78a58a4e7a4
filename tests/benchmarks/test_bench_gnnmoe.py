"""Smoke runs of benchmarks/bench_gnnmoe.py (--quick, one setting, one router) so that the benchmark does not rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_gnnmoe.py"


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's peft_gnnmoe, not the editable install's
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, check=True, env=env
    ).stdout


@pytest.mark.slow
def test_quick_run_writes_ratios_to_lora_and_prints_the_table(tmp_path):
    output = tmp_path / "bench.json"
    args = ["--quick", "--settings", "tiny", "--routers", "gcn", "--repeats", "1", "--no-memory"]
    stdout = _run(*args, "--output", str(output))
    result = json.loads(output.read_text())
    assert [row["variant"] for row in result["rows"]] == ["lora", "gnnmoe-gcn", "gnnmoe-gcn-keep"]
    assert result["rows"][0]["train_vs_lora"] == 1.0
    assert result["rows"][1]["train_step_s"] > 0
    assert result["rows"][1]["inference_s"] > 0
    lora, gnnmoe, keep = result["rows"]
    assert lora["train_flops_vs_lora"] == 1.0
    assert lora["train_gflop"] > lora["inference_gflop"] > 0  # a training step also runs the backward pass
    assert gnnmoe["train_gflop"] > lora["train_gflop"]  # the experts and the router add matmuls
    assert gnnmoe["train_gflop"] > keep["train_gflop"]  # recomputing the router runs its matmuls again
    assert gnnmoe["inference_gflop"] == keep["inference_gflop"]  # inference keeps nothing for a backward pass
    assert gnnmoe["inference_flops_vs_lora"] == gnnmoe["inference_gflop"] / lora["inference_gflop"]
    assert len(result["loadavg_start"]) == 3
    assert "| gnnmoe-gcn |" in stdout
    assert "load average at end" in stdout


@pytest.mark.slow
def test_memory_worker_reports_the_peak_a_training_step_adds():
    stdout = _run("--worker", "tiny", "gnnmoe-gcn", "--quick")
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["variant"] == "gnnmoe-gcn"
    assert report["peak_extra_mb"] > 0


@pytest.mark.slow
def test_quick_run_in_bfloat16_on_cpu(tmp_path):
    output = tmp_path / "bench.json"
    args = ["--quick", "--settings", "tiny", "--routers", "gcn", "--repeats", "1", "--no-memory", "--dtype", "bf16"]
    stdout = _run(*args, "--output", str(output))
    result = json.loads(output.read_text())
    assert result["config"]["dtype"] == "bf16"
    assert result["rows"][1]["train_step_s"] > 0
    assert "bf16" in stdout


def test_expert_scaling_and_keep_variants_set_their_config():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_gnnmoe
    finally:
        sys.path.remove(str(BENCH.parent))
    names = bench_gnnmoe.variants("scaling", ["gcn"])
    assert names[0] == "lora" and len(names) == 2 + 2 * len(bench_gnnmoe.SCALING_EXPERTS)
    assert (
        bench_gnnmoe.peft_config("gnnmoe-gcn-e4-keep", bench_gnnmoe.SETTINGS["scaling"]).recompute_intermediates
        is False
    )
    assert bench_gnnmoe.variants("vits", ["gat", "gcn"])[-1] == "gnnmoe-gat-keep"
    assert not any(name.endswith("keep") for name in bench_gnnmoe.variants("vitb", ["gcn"]))
    config = bench_gnnmoe.peft_config("gnnmoe-gcn-e16-dense", bench_gnnmoe.setting("scaling", quick=True))
    assert (config.router, config.num_experts, config.expert_dispatch, config.top_k) == ("gcn", 16, "dense", 2)
    assert bench_gnnmoe.peft_config("gnnmoe-gcn-e32", bench_gnnmoe.SETTINGS["scaling"]).expert_dispatch == "auto"


@pytest.mark.slow
def test_kron_orders_quick_run_times_both_orders(tmp_path):
    output = tmp_path / "orders.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = ROOT / "benchmarks" / "bench_kron_orders.py"
    subprocess.run([sys.executable, str(script), "--quick", "--output", str(output)], check=True, env=env)
    rows = json.loads(output.read_text())["rows"]
    assert [(r["num_experts"], r["top_k"]) for r in rows] == [(8, 1), (8, 2)]
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert [r["auto_takes"] for r in rows] == ["sparse", "dense"]


@pytest.mark.slow
def test_recompute_ablation_quick_run_switches_the_routers_and_the_experts(tmp_path):
    output = tmp_path / "ablation.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = ROOT / "benchmarks" / "recompute_ablation.py"
    args = ["--quick", "--repeats", "1", "--setting", "tiny", "--output", str(output)]
    subprocess.run([sys.executable, str(script), *args], check=True, env=env, capture_output=True)
    rows = {r["variant"]: r for r in json.loads(output.read_text())["rows"]}
    assert list(rows) == ["lora", "recompute both (default)", "routers only", "experts only", "keep both"]
    assert rows["lora"]["train_vs_lora"] == 1.0 and all(r["train_step_s"] > 0 for r in rows.values())
