"""save_pretrained -> PeftConfig / PeftModel.from_pretrained round trip of a sink-decorrelation adapter."""

from __future__ import annotations

import json

import pytest
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


def _python_block(card: str) -> str:
    start = card.index("```python\n") + len("```python\n")
    return card[start : card.index("```", start)]


@pytest.mark.slow
def test_model_card_shows_a_loading_snippet_that_works(tmp_path, make_lm, sink_model, lm_batch):
    import subprocess
    import sys

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_lm().save_pretrained(base_dir)
    model = sink_model()  # same seed as the saved base
    model.base_model.model.config.name_or_path = str(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    model.save_pretrained(adapter_dir)  # saving again replaces the section
    card = (adapter_dir / "README.md").read_text()
    assert card.count("<!-- peft-gnnmoe:usage -->") == 1
    assert "KeyError: 'SINK_DECORRELATION'" in card
    snippet = _python_block(card)
    assert snippet.startswith("import peft_gnnmoe")
    assert repr(str(base_dir)) in snippet
    batch = lm_batch()
    with torch.no_grad():
        expected = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    script = snippet.replace("path/to/this/adapter", str(adapter_dir)) + (
        "\nimport torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = model.eval()(input_ids=io['batch']['input_ids'], attention_mask=io['batch']['attention_mask'])\n"
        "assert torch.allclose(got.logits, io['expected'], atol=1e-6), (got.logits - io['expected']).abs().max()\n"
        "print('LOADED')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "LOADED" in result.stdout, result.stderr[-2000:]
