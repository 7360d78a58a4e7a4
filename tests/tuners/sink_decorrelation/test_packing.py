"""Packed (padding-free) rows: every packed sequence is decorrelated against its own BOS, over its own tokens, and
weighted as in a padded batch (issue 26, item 1). A packed row must give the padded batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from peft_gnnmoe.utils.packing import packed_layout

from ...conftest import BOS, PAD, VOCAB, _sink_model

LENGTHS = (6, 3, 5, 4)


def _sequences(lengths=LENGTHS, prompt: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of each sequence: BOS first, labels -100 on BOS and the prompt (TRL's completion-only loss)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.cat([torch.tensor([BOS]), torch.randint(3, VOCAB, (n - 1,), generator=generator)])
        labels = ids.clone()
        labels[: min(prompt, n - 1)] = -100
        out.append((ids, labels))
    return out


def _padded(sequences) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in sequences)
    batch = {
        "input_ids": torch.full((len(sequences), width), PAD),
        "attention_mask": torch.zeros(len(sequences), width, dtype=torch.long),
        "labels": torch.full((len(sequences), width), -100),
    }
    for row, (ids, labels) in enumerate(sequences):
        batch["input_ids"][row, : len(ids)], batch["labels"][row, : len(ids)] = ids, labels
        batch["attention_mask"][row, : len(ids)] = 1
    return batch


def _packed(sequences, rows: int = 1, pad_to: int = 0) -> dict[str, torch.Tensor]:
    """TRL's padding-free layout: sequences concatenated into ``rows`` rows, position_ids restarting at each, no
    attention_mask; trailing padding (pad_to_multiple_of) gets position 0 and label -100."""
    per_row = [sequences[i::rows] for i in range(rows)]
    width = max(sum(len(ids) for ids, _ in row) for row in per_row) + pad_to
    batch = {
        "input_ids": torch.full((rows, width), PAD),
        "position_ids": torch.zeros(rows, width, dtype=torch.long),
        "labels": torch.full((rows, width), -100),
    }
    for r, row in enumerate(per_row):
        ids = torch.cat([ids for ids, _ in row])
        labels = torch.cat([labels for _, labels in row])
        positions = torch.cat([torch.arange(len(ids)) for ids, _ in row])
        batch["input_ids"][r, : len(ids)], batch["labels"][r, : len(ids)] = ids, labels
        batch["position_ids"][r, : len(ids)] = positions
    return batch


def _run(batch, **config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = _sink_model(weight=1.0, **config).double()
    extra = {k: batch.pop(k) for k in ("num_items_in_batch",) if k in batch}
    out = model(**batch, **extra, use_cache=False)  # a cache turns transformers' packed-sequence masks off
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    parts = {"loss": out.loss, "ce_loss": out.ce_loss, "decorrelation_loss": out.decorrelation_loss}
    return {k: v.detach() for k, v in parts.items()}, grads


def _assert_same(packed, padded, rtol: float = 1e-5) -> None:
    for key in padded[0]:
        torch.testing.assert_close(packed[0][key], padded[0][key], rtol=rtol, atol=0)
    torch.testing.assert_close(packed[1], padded[1], rtol=rtol, atol=1e-12)


# the reference code's selection pooled over the micro-batch, or per sequence, each with Trainer's num_items_in_batch
@pytest.mark.parametrize("tokens", ["all", "prefix", "reference"])
@pytest.mark.parametrize("reduction", ["sample", "tokens"])
@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_a_packed_row_gives_the_padded_batch_loss_and_gradients(tokens, reduction, num_items_in_batch):
    sequences = _sequences()
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    padded = _run({**_padded(sequences), **extra}, tokens=tokens, reduction=reduction)
    packed = _run({**_packed(sequences), **extra}, tokens=tokens, reduction=reduction)
    assert padded[0]["decorrelation_loss"] > 0
    _assert_same(packed, padded)


def test_several_packed_rows_with_trailing_padding_and_bos_first():
    sequences = _sequences(lengths=(6, 3, 5, 4, 2, 7))
    padded = _run(_padded(sequences), bos="first")
    packed = _run(_packed(sequences, rows=2, pad_to=3), bos="first")
    _assert_same(packed, padded)


def test_per_sample_parts_are_per_packed_sequence():
    model = _sink_model(weight=1.0)
    model(**_packed(_sequences()), use_cache=False)
    assert model.last_loss_parts["per_sample"].shape == (len(LENGTHS),)


def test_a_packed_sequence_without_bos_is_named():
    sequences = _sequences()
    sequences[2] = (sequences[2][0].clone().fill_(5), sequences[2][1])
    model = _sink_model()
    with pytest.raises(ValueError, match=r"sequences \[2\] contain no BOS token"):
        model(**_packed(sequences), use_cache=False)


def test_what_packed_rows_cannot_say_raises_at_the_first_forward():
    model = _sink_model()
    batch = _packed(_sequences())
    with pytest.raises(ValueError, match="bos_positions= gives one BOS per row.*bos='first'"):
        model(**batch, bos_positions=0, use_cache=False)
    cu_seq_lens = torch.tensor([0, 6, 9, 14, 18], dtype=torch.int32)
    batch.pop("position_ids")
    with pytest.raises(ValueError, match="packed-sequence arguments.*pass position_ids"):
        model(**batch, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, use_cache=False)


def test_packed_layout_follows_transformers_sequence_boundaries():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [5, 6, 7, 8, 0, 1, 2]])
    layout = packed_layout(positions, 2, 7)
    assert layout.sequence.tolist() == [[0, 0, 0, 1, 1, 2, 3], [4, 4, 4, 4, 5, 5, 5]]
    assert layout.start.tolist() == [[0, 0, 0, 3, 3, 5, 6], [0, 0, 0, 0, 4, 4, 4]]
    assert layout.lengths.tolist() == [3, 2, 1, 1, 4, 3]
    assert packed_layout(torch.arange(7)[None], 2, 7) is None  # one sequence per row: the padded path
