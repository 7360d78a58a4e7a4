"""The plots: what each figure draws, read back from the matplotlib objects."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
import transformers as T

from peft_gnnmoe.analysis import attention_sink_scores, bos_cosine_similarity, find_massive_activations
from peft_gnnmoe.analysis.plotting import (
    attention_sinks_figure,
    bos_cosine_figure,
    clean_token,
    default_head_layer,
    massive_activations_figure,
    plot_massive_activations,
)

KEYS = ("input_ids", "attention_mask")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _planted_llama(make_lm, value: float = 5000.0):
    model = make_lm("llama", mlp_bias=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.bias[5] = value
    return model


def _tiny_bert():
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return T.BertModel(config).eval()


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_massive_plot_draws_the_ratio_threshold_over_the_median(make_lm, lm_batch):
    report = find_massive_activations(_planted_llama(make_lm), lm_batch()["input_ids"], ratio_threshold=50.0)
    ax = massive_activations_figure(report).axes[0]
    expected = [50.0 * stats.median for stats in report.layers]
    assert list(_line(ax, "ratio threshold x median").get_ydata()) == pytest.approx(expected)


def test_massive_plot_shows_the_top_k_of_the_chosen_sequence(make_lm, lm_batch):
    data = lm_batch(lengths=(7, 5))
    report = find_massive_activations(_planted_llama(make_lm), {k: data[k] for k in KEYS})
    ax = massive_activations_figure(report, batch=1).axes[0]
    expected = [max(abs(e["value"]) for e in stats.top if e["batch"] == 1) for stats in report.layers]
    assert list(_line(ax, "top 1").get_ydata()) == pytest.approx(expected)


def test_massive_plot_labels_decoder_layers(make_lm, lm_batch):
    report = find_massive_activations(make_lm("llama"), lm_batch()["input_ids"])
    assert massive_activations_figure(report).axes[0].get_xlabel() == "decoder layer"


def test_massive_plot_labels_encoder_layers_as_layers(lm_batch):
    report = find_massive_activations(_tiny_bert(), lm_batch()["input_ids"])
    assert massive_activations_figure(report).axes[0].get_xlabel() == "layer"


def test_sink_plot_labels_encoder_layers_as_layers(lm_batch):
    report = attention_sink_scores(_tiny_bert(), lm_batch()["input_ids"])
    assert attention_sinks_figure(report).axes[0].get_ylabel() == "layer"


def test_cosine_colourbar_is_labelled(make_lm, lm_batch):
    report = bos_cosine_similarity(make_lm("llama"), lm_batch()["input_ids"])
    labels = [ax.get_ylabel() for ax in bos_cosine_figure(report).axes]
    assert "cosine similarity to BOS" in labels


def test_sink_colourbar_is_labelled(make_lm, lm_batch):
    report = attention_sink_scores(make_lm("llama"), lm_batch()["input_ids"])
    labels = [ax.get_ylabel() for ax in attention_sinks_figure(report).axes]
    assert "sink score (mean attention received)" in labels


@pytest.mark.parametrize(
    ("token", "label"), [("Ġquick", "quick"), ("▁the", "the"), ("Ċ", "\\n"), ("<s>", "<s>"), ("Ġ", "␣")]
)
def test_clean_token(token, label):
    assert clean_token(token) == label


def test_token_tick_labels_have_no_tokenizer_markers(make_lm):
    report = attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]))
    ax = attention_sinks_figure(report, tokens=["<s>", "ĠThe", "Ġfox", "Ċ"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<s>", "The", "fox", "\\n"]


def test_per_head_panel_shows_the_chosen_layer(make_lm):
    report = attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]))
    assert attention_sinks_figure(report, layer=2).axes[1].get_title() == "per head at decoder layer 2"


def test_per_head_panel_rejects_a_missing_layer(make_lm):
    report = attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]))
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        attention_sinks_figure(report, layer=3)


def test_default_head_layer_is_the_middle_without_intermediate_sinks(make_lm):
    report = attention_sink_scores(make_lm("llama"), torch.tensor([[1, 5, 9, 12]]))
    assert default_head_layer(report) == 1  # 3 layers


def test_default_head_layer_is_the_strongest_intermediate_sink():
    report = {
        "layer_scores": [[[0.5, 0.1, 0.0]] * 6],
        "baseline": [[0.6, 0.3, 0.1]],
        "layer_sinks": [
            {"batch": 0, "token": 0, "layers": [0, 1, 2, 3, 4, 5], "scores": [0.9] * 6},
            {"batch": 0, "token": 2, "layers": [3, 4], "scores": [0.4, 0.6]},
        ],
    }
    assert default_head_layer(report) == 4


def test_plot_writes_a_png(make_lm, lm_batch, tmp_path):
    report = find_massive_activations(_planted_llama(make_lm), lm_batch()["input_ids"])
    data = plot_massive_activations(report, tmp_path / "m.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
