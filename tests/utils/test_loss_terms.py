"""Extra loss terms weighted like the model's loss: the weights add up across micro-batches exactly as Trainer's
``num_items_in_batch`` normalisation does, with items counted as Trainer counts them."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from peft_gnnmoe.utils.loss_terms import (
    LossContext,
    add_to_loss,
    items_per_sample,
    loss_context,
    sample_weights,
    warn_once,
)


def _context(labels=None, num_items=None, shift_labels=None) -> LossContext:
    return LossContext(labels, shift_labels, num_items, None, True)


def _trainer(model, tmp_path) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    return Trainer(model=model, args=args)


def test_causal_lm_items_match_trainers_count(make_lm, lm_batch, tmp_path):
    model = make_lm()
    batch = lm_batch(lengths=(7, 5, 3))
    trainer = _trainer(model, tmp_path)
    expected = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    items = items_per_sample(_context(batch["labels"]), model, 3)
    assert items.tolist() == [6.0, 4.0, 2.0]  # the first label of each row is never a target
    assert items.sum().item() == expected.item()


def test_classification_items_match_trainers_count(make_vit, tmp_path):
    model = make_vit()
    labels = torch.tensor([0, 2, -100, 1])
    trainer = _trainer(model, tmp_path)
    expected = trainer._get_num_items_in_batch([{"labels": labels}], torch.device("cpu"))
    items = items_per_sample(_context(labels), model, 4)
    assert items.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert items.sum().item() == expected.item()


def test_shift_labels_take_precedence(make_lm):
    shift = torch.tensor([[5, -100, 7], [-100, -100, 1]])
    items = items_per_sample(_context(labels=torch.zeros(2, 4, dtype=torch.long), shift_labels=shift), make_lm(), 2)
    assert items.tolist() == [2.0, 1.0]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_weighted_term_over_micro_batches_is_the_full_batch_value(make_lm, k):
    model = make_lm()
    labels = torch.full((8, 6), 3)
    lengths = torch.tensor([6, 2, 5, 3, 6, 4, 1, 2])
    labels[torch.arange(6).expand(8, 6) >= lengths[:, None]] = -100
    term = torch.rand(8, generator=torch.Generator().manual_seed(0))
    num_items = items_per_sample(_context(labels), model, 8).sum()
    full = (sample_weights(_context(labels), model, 8, torch.device("cpu")) * term).sum()
    accumulated = sum(
        (sample_weights(_context(lab, num_items), model, len(lab), torch.device("cpu")) * t).sum()
        for lab, t in zip(labels.chunk(k), term.chunk(k))
    )
    torch.testing.assert_close(accumulated, full, rtol=1e-6, atol=0)


def test_without_labels_the_weights_are_a_plain_mean(make_lm):
    weights = sample_weights(_context(), make_lm(), 4, torch.device("cpu"))
    assert weights.tolist() == [0.25] * 4


def test_rows_of_labels_must_match_the_batch(make_lm):
    with pytest.raises(ValueError, match="one row per sample"):
        items_per_sample(_context(torch.zeros(3, 5, dtype=torch.long)), make_lm(), 2)


def test_add_to_loss_on_a_model_output():
    out = CausalLMOutputWithPast(loss=torch.tensor(1.5), logits=torch.zeros(1))
    out, added = add_to_loss(out, torch.tensor(0.25))
    assert added
    assert out.loss.item() == 1.75
    assert out["loss"].item() == 1.75


def test_add_to_loss_on_a_tuple_output():
    out, added = add_to_loss((torch.tensor(1.0), torch.zeros(2)), torch.tensor(0.5))
    assert added
    assert out[0].item() == 1.5
    assert out[1].shape == (2,)


def test_add_to_loss_reports_a_missing_loss():
    out = CausalLMOutputWithPast(loss=None, logits=torch.zeros(1))
    same, added = add_to_loss(out, torch.tensor(0.5))
    assert not added
    assert same.loss is None
    logits_first, added = add_to_loss((torch.zeros(2, 3),), torch.tensor(0.5))
    assert not added


def test_loss_context_names_positional_arguments(make_lm, lm_batch):
    model = make_lm()
    batch = lm_batch()
    context = loss_context(model, (batch["input_ids"], batch["attention_mask"]), {"labels": batch["labels"]})
    assert context.attention_mask is batch["attention_mask"]
    assert context.labels is batch["labels"]
    assert context.num_items_in_batch is None


def test_loss_context_reads_num_items_in_batch(make_lm, lm_batch):
    model = make_lm()
    context = loss_context(model, (), {**lm_batch(), "num_items_in_batch": torch.tensor(9)})
    assert int(context.num_items_in_batch) == 9


def test_warn_once_per_owner_and_key():
    owner_a, owner_b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with pytest.warns(UserWarning, match="first") as record:
        warn_once(owner_a, "k", "first")
        warn_once(owner_a, "k", "first")
        warn_once(owner_b, "k", "first")
        warn_once(owner_a, "other", "first")
    assert len(record) == 3
