"""Attention-sink scores against hand computations: causal and bidirectional queries, the uniform baseline, and sinks
judged per layer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T

from peft_gnnmoe.analysis import attention_sink_scores

KEYS = ("input_ids", "attention_mask")


def _tiny_bert(seed: int = 0) -> torch.nn.Module:
    """A tiny BERT with large random weights, so that its attention is far from uniform."""
    torch.manual_seed(seed)
    config = T.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        initializer_range=0.3,
    )
    return T.BertModel(config).eval()


def _uniform_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every query projection: all logits are 0, so each query spreads its attention evenly."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    return model


def _causal_uniform_score(k: int, length: int) -> float:
    """(1 / (T - k)) * sum_{i=k}^{T-1} 1 / (i + 1): what key k receives under uniform causal attention."""
    return sum(1.0 / (i + 1) for i in range(k, length)) / (length - k)


def _gpt2_with_sink(sink_token: int, layers=(1,), n_layer: int = 8) -> torch.nn.Module:
    """A GPT-2 whose ``layers`` send every query's attention to the token ``sink_token`` (all heads); the other
    layers are at random init (nearly uniform attention)."""
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=n_layer, n_head=4, bos_token_id=1, eos_token_id=2)
    model = T.AutoModelForCausalLM.from_config(config)
    width, head_dim = 32, 8
    with torch.no_grad():
        model.transformer.wte.weight[sink_token] = 0.0
        model.transformer.wte.weight[sink_token, 0] = 5.0  # feature 0 marks the sink token after ln_1
        for layer in layers:
            c_attn = model.transformer.h[layer].attn.c_attn  # Conv1D: [in, q | k | v]
            c_attn.weight[:, : 2 * width] = 0.0
            c_attn.bias[: 2 * width] = 0.0
            for head in range(4):
                c_attn.bias[head * head_dim] = 10.0  # every query: the same direction
                c_attn.weight[0, width + head * head_dim] = 10.0  # keys: aligned with it only at the sink token
    return model


def test_attention_sink_scores_match_a_manual_computation(make_lm, lm_batch):
    model = make_lm("llama")
    assert model.config._attn_implementation == "sdpa"
    data = lm_batch(lengths=(7, 5))
    report = attention_sink_scores(model, {k: data[k] for k in KEYS})
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the analysis only
    model.set_attn_implementation("eager")
    attentions = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], output_attentions=True)
    attentions = attentions.attentions
    for b, length in enumerate((7, 5)):
        for layer in range(3):
            for head in range(4):
                for k in range(7):
                    expected = 0.0 if k >= length else attentions[layer][b, head, k:length, k].mean().item()
                    assert report.scores[b][layer][head][k] == pytest.approx(expected, abs=1e-4)
    assert report.mean_scores[1][5:] == [0.0, 0.0]  # padded keys receive nothing
    # position 0 has the top score, as under uniform causal attention (what a random-init model is close to)
    assert max(range(7), key=lambda k: report.mean_scores[0][k]) == 0
    json.dumps(report.to_dict())


def test_sinks_pass_both_the_threshold_and_the_baseline_ratio():
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])  # token 9 at position 3
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9, layers=(1, 2, 3)), ids)
    expected = [k for k in range(12) if report.mean_scores[0][k] > 0.3 and report.relative_mean_scores[0][k] > 2.0]
    assert expected == [3]
    assert report.sink_tokens() == expected


def test_random_init_model_has_no_sinks_on_short_sequences(make_lm, lm_batch):
    """Its attention is nearly uniform: key 0 of 7 tokens gets H_7 / 7 = 0.37 > 0.3, which is no sink."""
    report = attention_sink_scores(make_lm("llama"), {k: lm_batch(lengths=(7, 5))[k] for k in KEYS})
    assert report.sinks == []


def test_causal_model_is_detected(make_lm):
    assert attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]])).causal is True


def test_gpt2_is_detected_as_causal(make_lm):
    assert attention_sink_scores(make_lm("gpt2"), torch.tensor([[1, 5, 9, 12]])).causal is True


def test_bert_is_detected_as_bidirectional():
    assert attention_sink_scores(_tiny_bert(), torch.tensor([[1, 5, 9, 12]])).causal is False


def test_encoder_scores_average_over_every_valid_query(lm_batch):
    bert = _tiny_bert()
    data = lm_batch(lengths=(7, 4))
    report = attention_sink_scores(bert, {k: data[k] for k in KEYS})
    bert.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = bert(**{k: data[k] for k in KEYS}, output_attentions=True).attentions
    for b, length in enumerate((7, 4)):
        for layer in range(2):
            for head in range(4):
                for k in range(length):  # every valid query i, also i < k
                    expected = attentions[layer][b, head, :length, k].mean().item()
                    assert report.scores[b][layer][head][k] == pytest.approx(expected, abs=1e-4)


def test_encoder_scores_of_a_sequence_sum_to_one(lm_batch):
    """Each valid query's weights over the valid keys sum to 1, so their mean over the queries does too."""
    data = lm_batch(lengths=(7, 4))
    report = attention_sink_scores(_tiny_bert(), {k: data[k] for k in KEYS})
    for b in range(2):
        for layer in range(2):
            for head in range(4):
                assert sum(report.scores[b][layer][head]) == pytest.approx(1.0, abs=1e-3)


def test_encoder_baseline_is_one_over_the_length(lm_batch):
    data = lm_batch(lengths=(7, 4))
    report = attention_sink_scores(_tiny_bert(), {k: data[k] for k in KEYS})
    assert report.baseline[1] == pytest.approx([0.25] * 4 + [0.0] * 3, abs=1e-4)


def test_causal_override_on_an_encoder_averages_over_later_queries_only(lm_batch):
    bert = _tiny_bert()
    data = lm_batch(lengths=(6,))
    report = attention_sink_scores(bert, {k: data[k] for k in KEYS}, causal=True)
    bert.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = bert(**{k: data[k] for k in KEYS}, output_attentions=True).attentions
    assert report.scores[0][0][0][2] == pytest.approx(attentions[0][0, 0, 2:, 2].mean().item(), abs=1e-4)


def test_causal_baseline_matches_the_closed_formula(make_lm, lm_batch):
    data = lm_batch(lengths=(9, 6), pad_side="left")
    report = attention_sink_scores(make_lm("llama"), {k: data[k] for k in KEYS})
    assert report.baseline[0] == pytest.approx([_causal_uniform_score(k, 9) for k in range(9)], abs=1e-4)
    assert report.baseline[1] == pytest.approx([0.0] * 3 + [_causal_uniform_score(k, 6) for k in range(6)], abs=1e-4)


def test_first_key_baseline_is_the_harmonic_number_over_the_length(make_lm):
    report = attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]))
    assert report.baseline[0][0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=1e-4)  # H_4 / 4 = 0.52


def test_uniform_attention_on_four_tokens_reports_no_sink(make_lm):
    """Uniform causal attention gives key 0 H_4/4 = 0.52 and key 1 0.36 (> 0.3): the baseline, not sinks."""
    report = attention_sink_scores(_uniform_attention(make_lm("llama")), torch.tensor([[1, 5, 9, 12]]))
    assert report.sinks == []


def test_uniform_attention_scores_equal_the_baseline(make_lm):
    report = attention_sink_scores(_uniform_attention(make_lm("llama")), torch.tensor([[1, 5, 9, 12]]))
    assert report.mean_scores[0] == pytest.approx(report.baseline[0], abs=1e-4)


def test_uniform_attention_is_one_times_the_baseline(make_lm):
    report = attention_sink_scores(_uniform_attention(make_lm("llama")), torch.tensor([[1, 5, 9, 12]]))
    assert report.relative_mean_scores[0] == pytest.approx([1.0] * 4, abs=1e-3)


def test_ratio_below_one_is_rejected(make_lm):
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]), ratio=0.5)


def test_a_sink_in_one_layer_is_reported_per_layer():
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])  # token 9 at position 3
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9), ids)
    assert [(s["token"], s["layers"]) for s in report.layer_sinks] == [(3, [1])]


def test_a_sink_in_one_layer_scores_one_there():
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9), ids)
    assert report.layer_scores[0][1][3] == pytest.approx(1.0, abs=1e-3)


def test_a_sink_in_one_layer_is_missed_by_the_mean_over_layers():
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9), ids)
    assert report.mean_scores[0][3] < 0.3
    assert report.sink_tokens() == []


def test_sink_tokens_at_a_layer():
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9), ids)
    assert report.sink_tokens(layer=1) == [3]
    assert report.sink_tokens(layer=2) == []


def test_relative_scores_are_scores_over_the_baseline(make_lm, lm_batch):
    report = attention_sink_scores(make_lm("llama"), {k: lm_batch(lengths=(7, 5))[k] for k in KEYS})
    for k in range(5):
        expected = report.layer_scores[1][2][k] / report.baseline[1][k]
        assert report.relative_layer_scores[1][2][k] == pytest.approx(expected, rel=2e-3)
    assert math.isclose(report.relative_layer_scores[1][2][6], 0.0)  # padding


def test_unknown_attention_kind_asks_for_the_causal_argument():
    with pytest.raises(ValueError, match="Pass causal=True"):
        attention_sink_scores(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.tensor([[1, 2]]))


def test_sink_rate_is_the_share_of_layer_head_pairs_above_the_threshold():
    """The sink takes all attention in 3 of 8 layers (4 heads each); the random-init layers stay near uniform."""
    ids = torch.tensor([[1, 20, 31, 9, 44, 17, 52, 23, 38, 11, 60, 27]])
    report = attention_sink_scores(_gpt2_with_sink(sink_token=9, layers=(1, 2, 3)), ids)
    assert report.sink_rate[0][3] == pytest.approx(3 * 4 / (8 * 4))
