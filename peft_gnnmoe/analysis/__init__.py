"""Find attention sinks and massive activations in transformers models.

The functions return plain dataclasses (``.to_dict()`` is JSON-serialisable); plotting lives in
``peft_gnnmoe.analysis.plotting``.

Example:
    ```py
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel
    >>> from peft_gnnmoe.analysis import attention_sink_scores, bos_cosine_similarity, find_massive_activations
    >>> llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                    num_attention_heads=2, num_key_value_heads=2))
    >>> batch = {"input_ids": torch.tensor([[1, 5, 9, 12, 7]])}
    >>> report = find_massive_activations(llm, batch)  # report.massive: layer, token, feature, value, origin
    >>> cosine = bos_cosine_similarity(llm, batch).cosine  # [batch][layer][token]
    >>> vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                          image_size=32, patch_size=8))
    >>> sinks = attention_sink_scores(vit, {"pixel_values": torch.randn(1, 3, 32, 32)})  # ViTs: CLS is position 0
    >>> tokens = sinks.sink_tokens()
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
