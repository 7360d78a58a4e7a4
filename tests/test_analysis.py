"""Analysis tools on tiny models with planted massive activations, against manual computations, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from peft_gnnmoe.analysis import attention_sink_scores, bos_cosine_similarity, find_massive_activations
from peft_gnnmoe.cli import main

from .test_sink_model import batch, make_lm


def _planted_llama(branch: str, layer: int, feature: int, value: float):
    model = make_lm("llama", mlp_bias=True, attention_bias=True)
    module = model.model.layers[layer].mlp.down_proj if branch == "mlp" else model.model.layers[layer].self_attn.o_proj
    with torch.no_grad():
        module.bias[feature] = value
    return model


@pytest.mark.parametrize(("branch", "value"), [("mlp", 5000.0), ("attention", -3000.0)])
def test_planted_massive_activation_is_found_with_its_origin(branch, value):
    model = _planted_llama(branch, layer=1, feature=5, value=value)
    data = batch(pad_side="left")
    report = find_massive_activations(model, {k: data[k] for k in ("input_ids", "attention_mask")})
    assert report.first_layer == 1
    assert report.features == {5: 7 + 5}  # every valid token of both sequences, never a padded one
    assert report.repeated_features == [5]
    assert report.origins == {branch: 12}  # created once per token at layer 1, carried afterwards
    created = [m for m in report.massive if m.layer == 1]
    assert all(m.origin == branch and abs(m.value) > 1000 for m in created)
    assert all(m.origin == "residual" for m in report.massive if m.layer == 2)
    assert {(m.batch, m.token) for m in report.massive} == {(0, t) for t in range(7)} | {(1, t) for t in range(2, 7)}
    assert report.layers[2].top[0]["feature"] == 5
    json.dumps(report.to_dict())
    # thresholds are configurable
    assert find_massive_activations(model, data["input_ids"], ratio_threshold=1e9).massive == []


def test_gpt2_and_encoders_are_supported():
    gpt2 = make_lm("gpt2")
    with torch.no_grad():
        gpt2.transformer.h[1].mlp.c_proj.bias[3] = 4000.0
    report = find_massive_activations(gpt2, batch()["input_ids"])
    assert report.first_layer == 1 and report.origins.keys() == {"mlp"}
    torch.manual_seed(0)
    bert = T.BertModel(
        T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    assert len(find_massive_activations(bert, batch()["input_ids"]).layers) == 2


def test_attention_sink_scores_match_a_manual_computation():
    model = make_lm("llama")
    assert model.config._attn_implementation == "sdpa"
    data = batch(lengths=(7, 5))
    report = attention_sink_scores(model, {k: data[k] for k in ("input_ids", "attention_mask")})
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the analysis only
    model.set_attn_implementation("eager")
    attentions = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], output_attentions=True)
    attentions = attentions.attentions
    for b, length in enumerate((7, 5)):
        for layer in range(3):
            for head in range(4):
                for k in range(7):
                    expected = 0.0 if k >= length else attentions[layer][b, head, k:length, k].mean().item()
                    assert report.scores[b][layer][head][k] == pytest.approx(expected, abs=1e-4)
    assert report.mean_scores[1][5:] == [0.0, 0.0]  # padded keys receive nothing
    # at random init the first token already takes more than its share: position 0 has the top score
    assert max(range(7), key=lambda k: report.mean_scores[0][k]) == 0
    assert [s["token"] for s in report.sinks if s["batch"] == 0] == [
        k for k in range(7) if report.mean_scores[0][k] > 0.3
    ]
    json.dumps(report.to_dict())


def test_bos_cosine_matches_hooked_hidden_states():
    lm = make_lm("llama")
    model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"]))  # a PeftModel is unwrapped
    data = batch(lengths=(7, 4), pad_side="left")
    report = bos_cosine_similarity(
        model, {k: data[k] for k in ("input_ids", "attention_mask")}, layers=[0, 2], bos="token"
    )
    assert report.bos_positions == [0, 3]
    captured = {}
    handles = [
        lm.model.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in (0, 2)
    ]
    with torch.no_grad():
        lm(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    for handle in handles:
        handle.remove()
    for row, layer in enumerate((0, 2)):
        h = captured[layer][1]
        expected = torch.nn.functional.cosine_similarity(h, h[3:4], dim=-1)
        assert report.cosine[1][row][:3] == [None, None, None]
        assert report.cosine[1][row][3:] == pytest.approx(expected[3:].tolist(), abs=1e-4)
    assert report.mean == pytest.approx(sum(report.mean_per_layer) / 2, abs=1e-4)


def test_cli_writes_json_and_plots(tmp_path):
    model_dir = tmp_path / "tiny"
    _planted_llama("mlp", layer=1, feature=5, value=5000.0).save_pretrained(model_dir)
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(model_dir), "--input-ids", "1,5,9,12,7,3", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"massive_activations", "attention_sinks", "bos_cosine"}
    assert report["massive_activations"]["first_layer"] == 1
    for name in ("massive_activations.png", "attention_sinks.png", "bos_cosine.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
