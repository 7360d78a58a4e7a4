"""Massive activations on tiny models with planted huge values: where, which feature, and which branch made them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from peft_gnnmoe.analysis import find_massive_activations

KEYS = ("input_ids", "attention_mask")


def _planted_llama(make_lm, branch: str, layer: int, feature: int, value: float):
    model = make_lm("llama", mlp_bias=True, attention_bias=True)
    module = model.model.layers[layer].mlp.down_proj if branch == "mlp" else model.model.layers[layer].self_attn.o_proj
    with torch.no_grad():
        module.bias[feature] = value
    return model


def _tiny_bert():
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return T.BertModel(config).eval()


@pytest.mark.parametrize(("branch", "value"), [("mlp", 5000.0), ("attention", -3000.0)])
def test_planted_massive_activation_is_found_with_its_origin(make_lm, lm_batch, branch, value):
    model = _planted_llama(make_lm, branch, layer=1, feature=5, value=value)
    data = lm_batch(pad_side="left")
    report = find_massive_activations(model, {k: data[k] for k in KEYS})
    assert report.first_layer == 1
    assert report.features == {5: 7 + 5}  # every valid token of both sequences, never a padded one
    assert report.repeated_features == [5]
    assert report.origins == {branch: 12}  # created once per token at layer 1, carried afterwards
    created = [m for m in report.massive if m.layer == 1]
    assert all(m.origin == branch for m in created)
    assert all(abs(m.value) > 1000 for m in created)
    assert all(m.origin == "residual" for m in report.massive if m.layer == 2)
    assert {(m.batch, m.token) for m in report.massive} == {(0, t) for t in range(7)} | {(1, t) for t in range(2, 7)}
    assert report.layers[2].top[0]["feature"] == 5
    json.dumps(report.to_dict())


def test_thresholds_are_configurable(make_lm, lm_batch):
    model = _planted_llama(make_lm, "mlp", layer=1, feature=5, value=5000.0)
    assert find_massive_activations(model, lm_batch()["input_ids"], ratio_threshold=1e9).massive == []


def test_gpt2_massive_activation_is_found_at_its_layer(make_lm, lm_batch):
    gpt2 = make_lm("gpt2")
    with torch.no_grad():
        gpt2.transformer.h[1].mlp.c_proj.bias[3] = 4000.0
    report = find_massive_activations(gpt2, lm_batch()["input_ids"])
    assert report.first_layer == 1


def test_gpt2_massive_activation_comes_from_the_mlp(make_lm, lm_batch):
    gpt2 = make_lm("gpt2")
    with torch.no_grad():
        gpt2.transformer.h[1].mlp.c_proj.bias[3] = 4000.0
    report = find_massive_activations(gpt2, lm_batch()["input_ids"])
    assert report.origins.keys() == {"mlp"}


def test_encoders_are_supported(lm_batch):
    assert len(find_massive_activations(_tiny_bert(), lm_batch()["input_ids"]).layers) == 2


def test_encoder_report_says_it_is_not_causal(lm_batch):
    assert find_massive_activations(_tiny_bert(), lm_batch()["input_ids"]).causal is False


def test_decoder_report_says_it_is_causal(make_lm, lm_batch):
    assert find_massive_activations(make_lm("llama"), lm_batch()["input_ids"]).causal is True


def _embedding_outlier_llama(make_lm, lm_tokens, token: int = 7, feature: int = 4, value: float = 3000.0):
    model = make_lm("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[token, feature] = value
    return model, torch.tensor([[lm_tokens["bos"], 11, token, 23, 31]])


def test_an_outlier_from_the_embeddings_is_attributed_to_them(make_lm, lm_tokens):
    model, ids = _embedding_outlier_llama(make_lm, lm_tokens)
    report = find_massive_activations(model, ids)
    first = [m for m in report.massive if m.layer == 0]
    assert [(m.token, m.feature, m.origin) for m in first] == [(2, 4, "embeddings")]


def test_embedding_outliers_count_as_created_by_the_embeddings(make_lm, lm_tokens):
    model, ids = _embedding_outlier_llama(make_lm, lm_tokens)
    assert find_massive_activations(model, ids).origins == {"embeddings": 1}


def test_embedding_outliers_are_carried_by_the_residual_afterwards(make_lm, lm_tokens):
    model, ids = _embedding_outlier_llama(make_lm, lm_tokens)
    report = find_massive_activations(model, ids)
    assert {m.origin for m in report.massive if m.layer > 0} == {"residual"}


def test_top_k_is_listed_for_every_sequence(make_lm, lm_batch):
    """Sequence 0's massive values must not crowd sequence 1's largest entries out of the list."""
    model = _planted_llama(make_lm, "mlp", layer=1, feature=5, value=5000.0)
    data = lm_batch(lengths=(7, 5))
    report = find_massive_activations(model, {k: data[k] for k in KEYS}, top_k=3)
    for stats in report.layers:
        assert [e["batch"] for e in stats.top] == [0, 0, 0, 1, 1, 1]


def test_top_k_of_a_sequence_are_its_largest_values(make_lm, lm_batch):
    model = _planted_llama(make_lm, "mlp", layer=1, feature=5, value=5000.0)
    data = lm_batch(lengths=(7, 5))
    captured = {}
    handle = model.model.layers[2].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    with torch.no_grad():
        model(**{k: data[k] for k in KEYS})
    handle.remove()
    report = find_massive_activations(model, {k: data[k] for k in KEYS}, top_k=3)
    expected = captured["h"][1, :5].abs().flatten().topk(3).values.tolist()  # sequence 1's 5 valid tokens
    assert [abs(e["value"]) for e in report.layers[2].top if e["batch"] == 1] == pytest.approx(expected, rel=1e-4)
