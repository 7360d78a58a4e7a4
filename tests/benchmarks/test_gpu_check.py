"""benchmarks/gpu_check.sh: its CPU smoke run (``--device cpu --quick``), so that the GPU check cannot rot."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_MIXED_PRECISION", "CUDA_VISIBLE_DEVICES")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def _real_weights_or_skip() -> None:
    from recipes.common.pretrained.cache import cache_root
    from recipes.common.pretrained.dinov2_onnx import CONVERSION_RECORD, PRESET_NAME
    from recipes.common.pretrained.smollm2 import smollm2_gguf_path

    if not (cache_root() / PRESET_NAME / CONVERSION_RECORD).is_file() or smollm2_gguf_path() is None:
        pytest.skip("needs the converted DINOv2 ViT-S/14 and SmolLM2 (scripts/setup.sh)")


@pytest.mark.real_weights
def test_the_quick_cpu_run_writes_every_steps_json(tmp_path):
    _real_weights_or_skip()
    out = tmp_path / "check"
    run = _run("--device", "cpu", "--quick", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["quick"]) == ("cpu", True)
    assert [s["step"] for s in summary["steps"]] == ["benchmark", "dg", "avsr"]
    assert all(s["seconds"] > 0 and (out / s["output"]).exists() for s in summary["steps"])

    bench = json.loads((out / "bench_gnnmoe.json").read_text())
    assert bench["config"]["dtype"] == "bf16"
    variants = {(r["setting"], r["variant"]) for r in bench["rows"]}
    for router in ("gcn", "gat", "sage"):
        assert {("tiny", f"gnnmoe-{router}"), ("vits", f"gnnmoe-{router}"), ("vitb", f"gnnmoe-{router}")} <= variants
    assert {
        ("vitb", "lora"),
        ("vitb", "lokr"),
        ("scaling", "gnnmoe-gcn-e32"),
        ("scaling", "gnnmoe-gcn-e32-dense"),
    } <= (variants)
    assert all(r["train_step_s"] > 0 for r in bench["rows"])

    (result,) = [json.loads(p.read_text()) for p in (out / "dg" / "runs").glob("*/*/result.json")]
    assert result["records"] and result["records"][-1]["step"] == 2  # the dry run's two steps, evaluated

    (avsr,) = json.loads((out / "avsr" / "results.json").read_text())
    assert (avsr["llm"], avsr["training"]["steps"], avsr["test"]["n"]) == ("smollm2", 1, 1)


def test_bad_options_and_a_used_output_folder_are_refused_before_anything_runs(tmp_path):
    run = _run("--devices", "cpu")
    assert run.returncode == 2 and "unknown option '--devices'" in run.stderr
    run = _run("--device", "tpu")
    assert run.returncode == 2 and "--device must be cuda or cpu" in run.stderr
    (tmp_path / "old.json").write_text("{}")
    run = _run("--device", "cpu", "--quick", "--output", str(tmp_path))
    assert run.returncode == 2 and "is not empty" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # nothing written into the old run
