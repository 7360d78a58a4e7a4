"""tokens="reference": the reference code's selection (positions after BOS and before the transcript), exactly, also
on right-padded batches without an attention mask, where tokens="prefix" also takes the trailing padding."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_gnnmoe.tuners.sink_decorrelation.loss import reference_prefix_mask

PROMPT = 3  # tokens between BOS and the transcript in every row


def _right_padded_batch(lm_batch) -> dict[str, torch.Tensor]:
    data = lm_batch(lengths=(9, 6), pad_side="right")
    data["labels"][:, : 1 + PROMPT] = -100  # BOS and the prompt are no targets; the transcript follows
    return data


def _reference_code_loss(hidden_states: tuple[torch.Tensor, ...], prompt_lengths: list[int]) -> float:
    """The reference code, written out: HF hidden_states[1:L], positions 1..P of every row, cos^2 to position 0,
    summed over the batch and divided by the number of positions, then the mean over the layers."""
    per_layer = []
    for h in hidden_states[1:-1]:
        total, count = 0.0, 0
        for b, prompt in enumerate(prompt_lengths):
            anchor = h[b, 0].detach().double()
            for i in range(1, prompt + 1):
                x = h[b, i].detach().double()
                total += (float(x @ anchor) / math.sqrt(float(x @ x) * float(anchor @ anchor))) ** 2
                count += 1
        per_layer.append(total / count)
    return sum(per_layer) / len(per_layer)


def test_reference_tokens_and_reduction_match_the_reference_code(make_lm, sink_model, lm_batch):
    model = sink_model(weight=1.0, layers="all_but_last", tokens="reference", reduction="tokens")
    data = _right_padded_batch(lm_batch)
    del data["attention_mask"]  # the reference passes none
    got = model(**data).decorrelation_loss

    plain = get_peft_model(make_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    plain.load_state_dict(model.state_dict())
    hidden_states = plain(**data, output_hidden_states=True).hidden_states
    assert len(hidden_states) == 4  # embeddings + 3 layers; the last is normed and skipped like the reference does
    assert got.item() == pytest.approx(_reference_code_loss(hidden_states, [PROMPT, PROMPT]), rel=1e-5)


def test_prefix_without_attention_mask_takes_the_trailing_padding(sink_model, lm_batch):
    reference = sink_model(weight=1.0, layers="all_but_last", tokens="reference", reduction="tokens")
    prefix = sink_model(weight=1.0, layers="all_but_last", tokens="prefix", reduction="tokens")
    data = _right_padded_batch(lm_batch)
    del data["attention_mask"]
    reference(**data)
    prefix(**data)
    assert not torch.allclose(
        prefix.last_loss_parts["decorrelation_loss"], reference.last_loss_parts["decorrelation_loss"]
    )


def test_with_an_attention_mask_prefix_and_reference_agree(sink_model, lm_batch):
    data = _right_padded_batch(lm_batch)
    reference = sink_model(weight=1.0, tokens="reference")(**data).decorrelation_loss
    prefix = sink_model(weight=1.0, tokens="prefix")(**data).decorrelation_loss
    torch.testing.assert_close(reference, prefix)


def test_reference_mask_on_constructed_labels():
    labels = torch.tensor(
        [
            [7, -100, -100, 4, 5, -100, -100],  # BOS has a label (ignored); prompt 1..2; transcript; padding
            [-100, -100, -100, -100, 6, -100, -100],  # prompt 1..3
            [-100, -100, -100, -100, -100, -100, -100],  # no transcript: nothing selected
            [-100, -100, 1, -100, -100, 8, -100],  # left padding, BOS at 2: prompt 3..4
        ]
    )
    mask = reference_prefix_mask(labels, torch.tensor([0, 0, 0, 2]))
    assert mask[0].nonzero().flatten().tolist() == [1, 2]
    assert mask[1].nonzero().flatten().tolist() == [1, 2, 3]
    assert mask[2].nonzero().flatten().tolist() == []
    assert mask[3].nonzero().flatten().tolist() == [3, 4]


def test_reference_tokens_need_labels(sink_model, lm_batch):
    model = sink_model(weight=1.0, tokens="reference")
    with pytest.raises(ValueError, match="tokens='reference' selects tokens by their labels"):
        model(input_ids=lm_batch()["input_ids"])


def test_reference_selection_all_but_last_and_prefix_tokens(sink_model, lm_batch):
    model = sink_model(weight=0.1, layers="all_but_last", tokens="prefix")
    data = lm_batch(lengths=(7, 7))
    data["labels"][:, :4] = -100  # BOS + 3 prompt tokens; the rest is the "transcript"
    prefix = model(**data).decorrelation_loss
    assert sorted(model.last_loss_parts["per_layer"]) == [0, 1]
    assert not torch.allclose(prefix, sink_model(weight=0.1, layers="all_but_last")(**data).decorrelation_loss)
    explicit = dict(data, decorrelation_mask=torch.arange(7).expand(2, 7) < 4)  # the same tokens, given directly
    del explicit["labels"]
    with pytest.warns(UserWarning, match="has no loss"):
        torch.testing.assert_close(model(**explicit).decorrelation_loss, prefix)
    with pytest.raises(ValueError, match="tokens='prefix'.*labels"):
        model(input_ids=data["input_ids"])
