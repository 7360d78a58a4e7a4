"""Find attention sinks and massive activations in transformers models.

The functions return plain dataclasses (``.to_dict()`` is JSON-serialisable); plotting lives in
``peft_gnnmoe.analysis.plotting``.

Example:
    ```py
    >>> from peft_gnnmoe.analysis import find_massive_activations, attention_sink_scores, bos_cosine_similarity
    >>> report = find_massive_activations(model, {"input_ids": ids})
    >>> report.massive[0].layer, report.massive[0].feature, report.massive[0].origin
    >>> attention_sink_scores(vit, {"pixel_values": images}).sink_tokens()  # ViTs: CLS is position 0
    ```
"""

from .cosine import BosCosineReport, bos_cosine_similarity
from .massive import LayerActivationStats, MassiveActivation, MassiveActivationReport, find_massive_activations
from .report import analyze
from .sinks import AttentionSinkReport, attention_sink_scores
from .vision import patch_grid, vision_token_labels

__all__ = [
    "AttentionSinkReport",
    "BosCosineReport",
    "LayerActivationStats",
    "MassiveActivation",
    "MassiveActivationReport",
    "analyze",
    "attention_sink_scores",
    "bos_cosine_similarity",
    "find_massive_activations",
    "patch_grid",
    "vision_token_labels",
]
