"""One call that runs the three analyses on a batch and returns a JSON-ready dict (used by the CLI)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._inputs import Batch, as_batch
from .cosine import bos_cosine_similarity
from .massive import find_massive_activations
from .sinks import attention_sink_scores


def analyze(
    model: nn.Module,
    batch: Batch,
    magnitude_threshold: float = 100.0,
    ratio_threshold: float = 1000.0,
    sink_threshold: float = 0.3,
    sink_ratio: float = 2.0,
    bos: str = "first",
    tokens: list[list[str]] | None = None,
    causal: bool | None = None,
) -> dict[str, Any]:
    """``{"massive_activations", "attention_sinks", "bos_cosine", "tokens"}``, each a plain dict.

    ``sink_threshold`` and ``sink_ratio`` are :func:`attention_sink_scores`' ``threshold`` and ``ratio``; ``causal``
    overrides the detection of decoder vs encoder attention.
    """
    batch = as_batch(batch)
    report = {
        "massive_activations": find_massive_activations(
            model, batch, magnitude_threshold=magnitude_threshold, ratio_threshold=ratio_threshold
        ).to_dict(),
        "attention_sinks": attention_sink_scores(
            model, batch, threshold=sink_threshold, ratio=sink_ratio, causal=causal
        ).to_dict(),
        "bos_cosine": bos_cosine_similarity(model, batch, bos=bos).to_dict(),
        "tokens": tokens,
    }
    for name in ("massive_activations", "bos_cosine"):  # one answer to "decoder or encoder" for every plot
        report[name]["causal"] = report["attention_sinks"]["causal"]
    return report
