"""Sink decorrelation: a loss-augmented PEFT wrapper that decorrelates hidden states from the BOS token."""

from peft_gnnmoe.registration import register_peft_type

from .config import SinkDecorrelationConfig
from .loss import (
    cosine_to_bos,
    decorrelation_token_mask,
    find_bos_positions,
    layer_decorrelation_loss,
    reference_prefix_mask,
)
from .model import SinkDecorrelationModel

__all__ = [
    "SinkDecorrelationConfig",
    "SinkDecorrelationModel",
    "cosine_to_bos",
    "decorrelation_token_mask",
    "find_bos_positions",
    "layer_decorrelation_loss",
    "reference_prefix_mask",
]

register_peft_type("sink_decorrelation", SinkDecorrelationConfig, SinkDecorrelationModel)
