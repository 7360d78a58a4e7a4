"""SinkDecorrelationConfig validation: every bad value raises early, naming the field."""

from __future__ import annotations

import math

import pytest

from peft_gnnmoe import SinkDecorrelationConfig


def test_unknown_layer_selection_is_rejected():
    with pytest.raises(ValueError, match="layers must be"):
        SinkDecorrelationConfig(layers="middle")


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError, match="weight must be >= 0"):
        SinkDecorrelationConfig(weight=-1.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_rejected(value):
    with pytest.raises(ValueError, match="weight must be a finite number"):
        SinkDecorrelationConfig(weight=value)


@pytest.mark.parametrize("value", ["0.1", None, True])
def test_weight_that_is_not_a_number_is_rejected(value):
    with pytest.raises(TypeError, match="weight must be a number"):
        SinkDecorrelationConfig(weight=value)


def test_unknown_tokens_and_reduction_are_rejected():
    with pytest.raises(ValueError, match="tokens must be 'all', 'prefix' or 'reference'"):
        SinkDecorrelationConfig(tokens="prompt")
    with pytest.raises(ValueError, match="reduction must be 'sample' or 'tokens'"):
        SinkDecorrelationConfig(reduction="mean")


def test_defaults_are_the_accumulation_invariant_ones():
    config = SinkDecorrelationConfig()
    assert config.reduction == "sample"
    assert config.weight == 0.1
