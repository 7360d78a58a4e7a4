"""Cosine similarity to BOS against hidden states captured with forward hooks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_gnnmoe.analysis import bos_cosine_similarity

KEYS = ("input_ids", "attention_mask")


def test_bos_cosine_matches_hooked_hidden_states(make_lm, lm_batch):
    lm = make_lm("llama")
    model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"]))  # a PeftModel is unwrapped
    data = lm_batch(lengths=(7, 4), pad_side="left")
    report = bos_cosine_similarity(model, {k: data[k] for k in KEYS}, layers=[0, 2], bos="token")
    assert report.bos_positions == [0, 3]
    captured = {}
    handles = [
        lm.model.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in (0, 2)
    ]
    with torch.no_grad():
        lm(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    for handle in handles:
        handle.remove()
    for row, layer in enumerate((0, 2)):
        h = captured[layer][1]
        expected = torch.nn.functional.cosine_similarity(h, h[3:4], dim=-1)
        assert report.cosine[1][row][:3] == [None, None, None]
        assert report.cosine[1][row][3:] == pytest.approx(expected[3:].tolist(), abs=1e-4)
    assert report.mean == pytest.approx(sum(report.mean_per_layer) / 2, abs=1e-4)


def test_bos_cosine_report_says_the_model_is_causal(make_lm, lm_batch):
    assert bos_cosine_similarity(make_lm("llama"), lm_batch()["input_ids"]).causal is True
