"""save_pretrained -> PeftConfig / PeftModel.from_pretrained round trip of a sink-decorrelation adapter."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file

from peft_gnnmoe import SinkDecorrelationConfig, SinkDecorrelationModel


def test_round_trip(tmp_path, make_lm, sink_model, lm_batch):
    model = sink_model(
        weight=0.25,
        layers="all_but_last",
        tokens="prefix",
        form="abs",
        base_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SINK_DECORRELATION"
    assert saved["base_config"]["peft_type"] == "LORA"
    assert sorted(saved["base_config"]["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 3 * 2 * 2  # 3 layers x (q, v) x (A, B)
    assert all(".lora_" in k for k in tensors)

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SinkDecorrelationConfig)
    assert isinstance(config.base_config, LoraConfig)
    assert config.base_config.r == 4
    assert config.weight == 0.25
    assert config.layers == "all_but_last"
    assert config.tokens == "prefix"
    assert config.form == "abs"

    loaded = PeftModel.from_pretrained(make_lm(), tmp_path, is_trainable=True)
    assert isinstance(loaded.base_model, SinkDecorrelationModel)
    original, restored = model.state_dict(), loaded.state_dict()
    lora_keys = [k for k in original if "lora_" in k]
    assert lora_keys
    for key in lora_keys:
        assert torch.equal(original[key], restored[key]), key

    data = lm_batch()
    data["labels"][:, :3] = -100
    expected = model(**data)
    got = loaded.train()(**data)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.decorrelation_loss, expected.decorrelation_loss)
    assert sorted(loaded.last_loss_parts["per_layer"]) == [0, 1]
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


def test_inference_load_is_frozen(tmp_path, make_lm, sink_model):
    sink_model(weight=0.1).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_lm(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_config_saved_before_reduction_existed_loads_with_the_default(tmp_path, sink_model):
    sink_model(weight=0.1).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["reduction"]
    path.write_text(json.dumps(saved))
    assert PeftConfig.from_pretrained(tmp_path).reduction == "sample"
