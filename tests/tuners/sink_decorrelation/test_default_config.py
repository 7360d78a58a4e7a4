"""A default that trains: ``SinkDecorrelationConfig()`` brings PEFT's default LoRA; ``base_config=None`` warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_gnnmoe import SinkDecorrelationConfig


def test_default_config_trains_peft_default_lora_on_the_attention_projections(make_lm, lm_batch, tmp_path):
    model = get_peft_model(make_lm("llama"), SinkDecorrelationConfig()).train()
    inner = model.peft_config["default"].base_config
    assert isinstance(inner, LoraConfig) and inner.r == LoraConfig().r
    assert set(inner.target_modules) == {"q_proj", "v_proj"}  # PEFT's own choice for Llama
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    out = model(**lm_batch())
    assert out.decorrelation_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_lm("llama"), tmp_path)
    assert set(reloaded.peft_config["default"].base_config.target_modules) == {"q_proj", "v_proj"}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_default_configs_do_not_share_their_inner_config():
    assert SinkDecorrelationConfig().base_config is not SinkDecorrelationConfig().base_config


def test_base_config_none_warns_that_nothing_trains(make_lm):
    with pytest.warns(UserWarning, match=r"base_config=None\) injects no adapter .* no trainable parameter"):
        model = get_peft_model(make_lm("llama"), SinkDecorrelationConfig(base_config=None))
    assert not any(p.requires_grad for p in model.parameters())


def test_base_config_none_in_inference_mode_does_not_warn(make_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(make_lm("llama"), SinkDecorrelationConfig(base_config=None, inference_mode=True))
