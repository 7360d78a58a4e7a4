"""Fast version of benchmarks/sink_training_effect.py: the loss keeps held-out hidden states away from BOS."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "sink_training_effect.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("sink_training_effect", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decorrelation_loss_lowers_bos_cosine_after_training():
    script = _load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        without = script.train(weight=0.0, steps=30)
        with_loss = script.train(weight=1.0, steps=30)
    finally:
        torch.set_num_threads(threads)
    print(
        f"mean cos to BOS after 30 steps: without loss {without['after']['mean_cos']:.3f} "
        f"(|cos| {without['after']['mean_abs_cos']:.3f}), with loss {with_loss['after']['mean_cos']:.3f} "
        f"(|cos| {with_loss['after']['mean_abs_cos']:.3f})"
    )
    assert without["before"] == with_loss["before"]  # same model, same data: only the loss differs
    assert with_loss["after"]["mean_abs_cos"] < 0.5 * without["after"]["mean_abs_cos"]
    assert with_loss["after"]["mean_cos"] < 0.5 * without["after"]["mean_cos"]
    assert abs(with_loss["final_ce"] - without["final_ce"]) < 0.3  # the language-model loss is not sacrificed
