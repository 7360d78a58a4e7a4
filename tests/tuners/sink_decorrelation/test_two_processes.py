"""1 vs 2 processes (torchrun, gloo on CPU) under Trainer give the same averaged gradients."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_gnnmoe

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("two_process_worker.py")


def _run(command: list[str]) -> None:
    # the workers import the same peft_gnnmoe as this test (the script's folder, not the checkout, is on their path)
    package_root = str(Path(peft_gnnmoe.__file__).resolve().parents[1])
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=python_path)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_one_and_two_processes_give_the_same_gradients(tmp_path):
    _run([sys.executable, str(WORKER), str(tmp_path / "one.safetensors")])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
        + [str(tmp_path / "two.safetensors")]
    )
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert sorted(two) == sorted(one)
    flat_one = torch.cat([one[k].flatten() for k in sorted(one)])
    flat_two = torch.cat([two[k].flatten() for k in sorted(one)])
    assert ((flat_two - flat_one).norm() / flat_one.norm()).item() <= 1e-5
