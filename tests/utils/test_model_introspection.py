"""One place for the architecture facts of transformers models: text config, decoder layers, BOS id."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from peft_gnnmoe.utils.model_introspection import (
    bos_token_id,
    find_decoder_layers,
    num_hidden_layers,
    resolve_layer_indices,
    text_config,
    unwrap_model,
)


@pytest.mark.parametrize(("arch", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_decoder_layers_are_found(make_lm, arch, path):
    found, layers = find_decoder_layers(make_lm(arch))
    assert found == path
    assert len(layers) == 3


def test_peft_models_are_unwrapped(make_lm):
    base = make_lm()
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_model(wrapped) is base
    assert num_hidden_layers(wrapped) == 3
    assert text_config(wrapped) is base.config


def test_bos_token_id_from_config_or_override(make_lm, lm_tokens):
    model = make_lm()
    assert bos_token_id(model) == lm_tokens["bos"]
    assert bos_token_id(model, override=7) == 7


def test_a_model_without_config_has_no_bos():
    import torch

    assert bos_token_id(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    ("spec", "expected"), [("all", [0, 1, 2, 3]), ("all_but_last", [0, 1, 2]), ([-1, 0, 0], [0, 3])]
)
def test_layer_selection(spec, expected):
    assert resolve_layer_indices(spec, 4) == expected


@pytest.mark.parametrize("spec", [[4], [-5], [], "every"])
def test_bad_layer_selection_raises(spec):
    with pytest.raises(ValueError):
        resolve_layer_indices(spec, 4)
