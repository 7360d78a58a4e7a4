"""One call that runs the three analyses on a batch and returns a JSON-ready dict (used by the CLI)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._inputs import Batch, as_batch
from .cosine import bos_cosine_similarity
from .massive import find_massive_activations
from .sinks import attention_sink_scores
from .vision import is_vision_batch, vision_token_labels


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

    ``batch`` may be text or an image model's ``pixel_values``; for images ``tokens`` defaults to the position names
    ``"CLS"``, ``"reg0"``, ``"p(row,col)"`` (one list per image) and the "BOS" of the cosine report is CLS.
    ``sink_threshold`` and ``sink_ratio`` are the ``threshold`` and ``ratio`` of
    [`attention_sink_scores`][peft_gnnmoe.analysis.attention_sink_scores]; ``causal`` overrides the detection of
    decoder vs encoder attention.
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
    if tokens is None and is_vision_batch(batch):
        num_tokens = len(report["attention_sinks"]["mean_scores"][0])
        labels = vision_token_labels(model, batch["pixel_values"], num_tokens)
        report["tokens"] = [labels] * batch["pixel_values"].shape[0]
    for name in ("massive_activations", "bos_cosine"):  # one answer to "decoder or encoder" for every plot
        report[name]["causal"] = report["attention_sinks"]["causal"]
    return report
