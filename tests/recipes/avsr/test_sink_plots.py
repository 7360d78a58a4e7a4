"""The sink experiment's figures: token bands of a sequence, and the cosine to BOS of sinks against other tokens."""

from types import SimpleNamespace

import pytest
import torch

from recipes.avsr.pipeline.sequences import SEG
from recipes.avsr.reports.sink_plots import _bands, sink_vs_other_cosine


def test_bands_are_the_runs_of_each_segment_without_padding():
    names = ["bos", "audio_delim", "audio", "audio", "audio_delim", "prompt", "prompt", "transcript", "eos", "pad"]
    assert _bands([SEG[n] for n in names]) == [
        ("bos", 0, 1), ("audio_delim", 1, 2), ("audio", 2, 4), ("audio_delim", 4, 5), ("prompt", 5, 7),
        ("transcript", 7, 8), ("eos", 8, 9),
    ]  # fmt: skip


def test_sink_and_other_tokens_are_averaged_apart_per_layer():
    segments = torch.tensor([[SEG["bos"], SEG["audio"], SEG["audio"], SEG["pad"]]])
    cosine = SimpleNamespace(layers=[0, 1], cosine=[[[1.0, 0.9, 0.1, None], [1.0, 0.2, 0.4, None]]])
    sinks = SimpleNamespace(layer_sinks=[{"batch": 0, "token": 0, "layers": [0, 1]}, {"batch": 0, "token": 1,
                                                                                      "layers": [0]}])  # fmt: skip
    sink_means, other_means = sink_vs_other_cosine(cosine, sinks, segments)
    assert sink_means == [0.9, None]  # token 1 is a sink at layer 0 only; BOS never counts
    assert other_means == pytest.approx([0.1, 0.3])
