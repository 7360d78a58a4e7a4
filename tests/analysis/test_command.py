"""``peft-gnnmoe analyze`` on a tiny saved Llama, with small offline tokenizers (byte-level words, +/- BOS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from peft_gnnmoe.cli import main

WORDS = ["The", "Ġquick", "Ġbrown", "Ġfox", "Ġjumps", "Ġover", "Ġthe", "Ġlazy", "Ġdog", ".", "ĠParis", "Ġis"]
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }}</s>{% endfor %}"


def _tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level over byte-level pieces ("Ġquick"); ids 0-3 are <pad>, <s>, </s>, <unk>, like the tiny LMs."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<user>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _planted_llama(make_lm):
    model = make_lm("llama", mlp_bias=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.bias[5] = 5000.0
    return model


@pytest.fixture
def model_dir(tmp_path, make_lm):
    """A tiny Llama with a planted massive activation, saved with a BOS-adding tokenizer."""
    path = tmp_path / "tiny"
    _planted_llama(make_lm).save_pretrained(path)
    _tokenizer(adds_bos=True).save_pretrained(path)
    return path


@pytest.fixture
def model_dir_without_bos(tmp_path, make_lm):
    path = tmp_path / "tiny_no_bos"
    _planted_llama(make_lm).save_pretrained(path)
    _tokenizer(adds_bos=False).save_pretrained(path)
    return path


def _run(model_dir, out, *extra: str) -> dict:
    assert main(["analyze", "--model", str(model_dir), "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_cli_writes_json_and_plots(tmp_path, make_lm):
    model_dir = tmp_path / "tiny"
    _planted_llama(make_lm).save_pretrained(model_dir)
    out = tmp_path / "report"
    report = _run(model_dir, out, "--input-ids", "1,5,9,12,7,3")
    assert set(report) >= {"massive_activations", "attention_sinks", "bos_cosine"}
    assert report["massive_activations"]["first_layer"] == 1
    for name in ("massive_activations.png", "attention_sinks.png", "bos_cosine.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5000


def test_model_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--output-dir", str(tmp_path)])
    assert "--model" in capsys.readouterr().err


def test_a_folder_that_holds_no_model_is_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit, match=f"--model '{missing}': cannot load a causal LM"):
        main(["analyze", "--model", str(missing), "--output-dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_a_hub_id_loads_through_the_hub_cache(model_dir, tmp_path):
    """``--model org/name`` goes through huggingface_hub's resolution: here an offline cache holding a snapshot."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "report"
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "peft_gnnmoe.cli", "analyze", "--model", "tiny-org/tiny-llama"]
    done = subprocess.run([*command, "--output-dir", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny-org/tiny-llama"
    assert report["massive_activations"]["first_layer"] == 1  # the planted activation of model_dir's weights


def test_text_gets_one_bos(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--text", "The quick brown fox")
    assert report["tokens"][0] == ["<s>", "The", "Ġquick", "Ġbrown", "Ġfox"]


def test_chat_does_not_duplicate_the_bos(model_dir, tmp_path):
    """The template writes BOS and the tokenizer adds one: the sequence must still start with a single BOS."""
    report = _run(model_dir, tmp_path / "out", "--chat", "--text", "The quick fox")
    assert report["tokens"][0].count("<s>") == 1


def test_chat_sequence_is_the_rendered_template(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--chat", "--text", "The quick fox")
    assert report["tokens"][0] == ["<s>", "<user>", "<unk>", "Ġquick", "Ġfox", "</s>"]  # " The" is not in the vocab


def test_chat_adds_the_bos_when_the_template_has_none(tmp_path, make_lm):
    path = tmp_path / "tiny_plain_template"
    _planted_llama(make_lm).save_pretrained(path)
    tokenizer = _tokenizer(adds_bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE.removeprefix("{{ bos_token }}")
    tokenizer.save_pretrained(path)
    report = _run(path, tmp_path / "out", "--chat", "--text", "The quick fox")
    assert report["tokens"][0][:2] == ["<s>", "<user>"]


def test_token_text_is_readable(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--text", "The quick brown fox")
    assert report["token_text"][0] == ["<s>", "The", " quick", " brown", " fox"]


def test_token_text_follows_the_padded_positions(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--text", "The quick brown fox", "--text", "The fox")
    assert report["token_text"][1] == ["<s>", "The", " fox", "", ""]


def test_bos_token_on_a_tokenizer_without_bos_is_a_clear_message(model_dir_without_bos, tmp_path):
    args = ["analyze", "--model", str(model_dir_without_bos), "--bos", "token", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--bos token: sequence.* contain no BOS token .*Use --bos first"):
        main(args)


def test_bos_token_with_a_bos_adding_tokenizer_finds_it(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--bos", "token", "--text", "The quick fox")
    assert report["bos_cosine"]["bos_positions"] == [0]


def test_dtype_bf16_runs_the_model_in_bfloat16(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--dtype", "bf16", "--text", "The quick brown fox")
    values = [abs(e["value"]) for layer in report["massive_activations"]["layers"] for e in layer["top"]]
    large = [v for v in values if v > 1000]
    assert large  # the planted 5000s
    assert all(torch.tensor(v).bfloat16().item() == v for v in large)  # bf16 numbers (spacing 8+ up there)


def test_dtype_is_recorded(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--dtype", "fp16", "--text", "The quick brown fox")
    assert report["dtype"] == "fp16"


def test_dtype_fp32_values_are_not_rounded_to_bf16(model_dir, tmp_path):
    report = _run(model_dir, tmp_path / "out", "--text", "The quick brown fox")
    values = [abs(e["value"]) for layer in report["massive_activations"]["layers"] for e in layer["top"]]
    assert any(torch.tensor(v).bfloat16().item() != v for v in values if v > 1000)


def test_device_cpu_is_accepted(model_dir, tmp_path):
    assert _run(model_dir, tmp_path / "out", "--device", "cpu", "--text", "The fox")["device"] == "cpu"


def test_unusable_device_is_a_clear_message(model_dir, tmp_path):
    args = ["analyze", "--model", str(model_dir), "--device", "nonsense", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--device 'nonsense' is not usable"):
        main(args)


def test_missing_head_layer_is_a_clear_message(model_dir, tmp_path):
    args = ["analyze", "--model", str(model_dir), "--head-layer", "3", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--head-layer 3 does not exist: the model has 3 layers"):
        main(args)


def test_summary_lists_sinks_per_layer(model_dir, tmp_path, capsys):
    _run(model_dir, tmp_path / "out", "--text", "The quick brown fox")
    assert "  per layer: " in capsys.readouterr().out
