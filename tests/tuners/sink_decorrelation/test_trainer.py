"""transformers.Trainer: gradient accumulation does not change the decorrelation term's weight, and Trainer settings
that remove the labels (label smoothing, compute_loss_func) or select no token never train silently without it."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

WEIGHT = 5.0
LENGTHS = (9, 4, 7, 6)  # four sequences of different lengths: micro-batches pad differently and hold unequal items


class GradientsBeforeTheFirstStep(TrainerCallback):
    """Keeps a copy of the adapter gradients when the first optimizer step is about to run."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _dataset(lm_batch) -> list[dict[str, torch.Tensor]]:
    data = lm_batch(seed=5, lengths=LENGTHS)
    return [{k: v[row, :length] for k, v in data.items()} for row, length in enumerate(LENGTHS)]


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seq_len = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.stack([torch.nn.functional.pad(r[key], (0, seq_len - len(r[key])), value=value) for r in rows])
        for key, value in pad.items()
    }


def _first_step_gradients(model, dataset, tmp_path, accumulation: int, **arguments) -> dict[str, torch.Tensor]:
    grab = GradientsBeforeTheFirstStep()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"k{accumulation}"),
        per_device_train_batch_size=len(dataset) // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **arguments,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate, callbacks=[grab]).train()
    return grab.grads


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(a)])
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_gives_the_gradients_of_one_batch(accumulation, sink_model, lm_batch, tmp_path):
    dataset = _dataset(lm_batch)
    one = _first_step_gradients(sink_model(weight=WEIGHT), dataset, tmp_path, 1)
    several = _first_step_gradients(sink_model(weight=WEIGHT), dataset, tmp_path, accumulation)
    assert sorted(several) == sorted(one)
    assert _relative_difference(several, one) <= 1e-5


def test_the_term_is_in_the_trainer_gradients(sink_model, lm_batch, tmp_path):
    dataset = _dataset(lm_batch)
    with_term = _first_step_gradients(sink_model(weight=WEIGHT), dataset, tmp_path, 1)
    without = _first_step_gradients(sink_model(weight=0.0), dataset, tmp_path, 1)
    assert _relative_difference(with_term, without) > 1e-2


def test_label_smoothing_warns_that_the_term_is_not_added(sink_model, lm_batch, tmp_path):
    with pytest.warns(UserWarning, match="has no loss .*label smoothing"):
        _first_step_gradients(sink_model(weight=WEIGHT), _dataset(lm_batch), tmp_path, 1, label_smoothing_factor=0.1)


def test_compute_loss_func_warns_that_the_term_is_not_added(sink_model, lm_batch, tmp_path):
    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    dataset = _dataset(lm_batch)
    model = sink_model(weight=WEIGHT)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=_collate, compute_loss_func=compute_loss
    )
    with pytest.warns(UserWarning, match="has no loss"):
        trainer.train()


def test_label_smoothing_with_prefix_tokens_raises(sink_model, lm_batch, tmp_path):
    with pytest.raises(ValueError, match="Trainer removes them when label smoothing"):
        _first_step_gradients(
            sink_model(weight=WEIGHT, tokens="prefix"), _dataset(lm_batch), tmp_path, 1, label_smoothing_factor=0.1
        )


def test_the_reference_reduction_warns_under_trainer(sink_model, lm_batch, tmp_path):
    model = sink_model(weight=WEIGHT, reduction="tokens")
    with pytest.warns(UserWarning, match="reduction='tokens'.*gradient accumulation"):
        _first_step_gradients(model, _dataset(lm_batch), tmp_path, 2)


def test_the_reference_reduction_is_not_accumulation_invariant(sink_model, lm_batch, tmp_path):
    # documents why it is not the default: the term is counted once per micro-batch
    dataset = _dataset(lm_batch)
    one = _first_step_gradients(sink_model(weight=WEIGHT, reduction="tokens"), dataset, tmp_path, 1)
    two = _first_step_gradients(sink_model(weight=WEIGHT, reduction="tokens"), dataset, tmp_path, 2)
    assert _relative_difference(two, one) > 0.1
