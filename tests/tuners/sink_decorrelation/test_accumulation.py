"""A plain accelerate training loop with gradient accumulation gives the gradients of one big batch."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

WEIGHT = 5.0


def _adapter_gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n])


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _micro_batches(data: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    size = data["input_ids"].shape[0] // k
    return [{key: v[i * size : (i + 1) * size] for key, v in data.items()} for i in range(k)]


def _loop_with_num_items(model, data: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Each micro-batch's loss is normalised by the items of the whole step (``num_items_in_batch``), as Trainer
    does; the micro-batch losses are summed by backward."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    num_items = int((data["labels"][:, 1:] != -100).sum())
    for micro in _micro_batches(data, k):
        accelerator.backward(model(**micro, num_items_in_batch=num_items).loss)
    return _adapter_gradients(model)


def _loop_with_accumulate(model, data: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """``accelerator.accumulate``: accelerate divides every micro-batch's (mean) loss by ``k``."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
    model = accelerator.prepare(model)
    for micro in _micro_batches(data, k):
        with accelerator.accumulate(model):
            accelerator.backward(model(**micro).loss)
    return _adapter_gradients(model)


@pytest.mark.parametrize("k", [2, 4])
def test_num_items_loop_matches_one_batch(k, sink_model, lm_batch):
    data = lm_batch(seed=2, lengths=(9, 4, 7, 6))  # unequal lengths: the micro-batches hold unequal items
    one = _loop_with_num_items(sink_model(weight=WEIGHT), data, 1)
    several = _loop_with_num_items(sink_model(weight=WEIGHT), data, k)
    assert _relative_difference(several, one) <= 1e-5


@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_loop_matches_one_batch(k, sink_model, lm_batch):
    data = lm_batch(seed=2, lengths=(8, 8, 8, 8))  # equal items per micro-batch: means of means are the mean
    one = _loop_with_accumulate(sink_model(weight=WEIGHT), data, 1)
    several = _loop_with_accumulate(sink_model(weight=WEIGHT), data, k)
    assert _relative_difference(several, one) <= 1e-5


def test_loss_parts_survive_accelerate_mixed_precision(sink_model, lm_batch):
    # accelerate rebuilds the output from its keys to cast it to float32; the parts must be keys, not attributes
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a singleton: other tests made it fp32
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = accelerator.prepare(sink_model(weight=WEIGHT))
        out = model(**lm_batch())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert out.decorrelation_loss > 0 and out.ce_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + WEIGHT * out.decorrelation_loss, rtol=1e-2, atol=1e-2)
    assert out.to_tuple()[:2] == (out.loss, out.logits)  # the model's own fields keep their positions
