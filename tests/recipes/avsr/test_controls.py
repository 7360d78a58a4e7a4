"""AVSR controls and augmentation, in units: chance level, derangements, stream swaps, babble SNR, time masking,
seed statistics and checkpoint averaging."""

import json
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from recipes.avsr.data.augment import Augmentation, BabbleBank, mix_at_snr, snr_db, time_mask
from recipes.avsr.data.collate import AVSRCollator
from recipes.avsr.data.dataset import AVSRDataset
from recipes.avsr.data.loader import LoaderConfig, make_loader
from recipes.avsr.data.lrs3 import Utterance
from recipes.avsr.data.media import load_audio, write_wav
from recipes.avsr.pipeline.averaging import average_checkpoints
from recipes.avsr.pipeline.config.cli import parse_config
from recipes.avsr.pipeline.controls import chance_baseline, derangement
from recipes.avsr.reports.seed_report import (
    differences_table,
    modality_differences,
    seed_summary,
    seed_table,
    write_seed_report,
)


def test_chance_baseline_is_the_wer_of_constant_training_transcripts():
    train = ["a b c", "a d c", "e b c"]
    chance = chance_baseline(train, ["a b c", "x y z"])
    assert chance["most_frequent_word"] == "c"
    assert chance["wer_most_frequent_word"] == pytest.approx(100 * 5 / 6, abs=0.01)  # 2 + 3 errors, 6 words
    assert chance["mode_transcript"] == "a b c"
    assert chance["wer_mode_transcript"] == pytest.approx(50.0)  # 0 + 3 errors
    assert chance["wer"] == pytest.approx(50.0)


def test_derangement_moves_every_item_and_is_fixed_by_its_seed():
    donors = derangement(9, seed=3)
    assert sorted(donors) == list(range(9))
    assert all(d != i for i, d in enumerate(donors))
    assert derangement(9, seed=3) == donors
    assert derangement(9, seed=4) != donors
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_seed_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"seed": s, "modality": "asr", "test": {"wer": w, "cer": w / 2}, "chance": {"wer": 80.0}, "wer_swap_audio": a}
        for s, w, a in [(0, 10.0, 70.0), (1, 14.0, 75.0), (2, 21.0, 90.0)]
    ]
    summary = seed_summary(runs)["asr"]
    assert summary["seeds"] == [0, 1, 2]
    assert summary["wer"]["mean"] == round(statistics.fmean([10, 14, 21]), 2)
    assert summary["wer"]["std"] == round(statistics.stdev([10, 14, 21]), 2)
    assert summary["chance_wer"]["std"] == 0.0
    assert summary["wer_swap_audio"]["mean"] == round(statistics.fmean([70, 75, 90]), 2)
    assert "wer_swap_video" not in summary  # not measured for asr
    assert f"{summary['wer']['mean']:.2f} ± {summary['wer']['std']:.2f}" in seed_table({"asr": summary})
    single = seed_table(seed_summary(runs[:1]))  # one seed measures no spread: the value alone, no "± 0.00"
    assert "| asr | 0 | 10.00 | 5.00 | 80.00 |" in single and "±" not in single


def _noisy_run(modality: str, seed: int, clean: float, at_0_db: float | None = None) -> dict:
    run = {"seed": seed, "modality": modality, "test": {"wer": clean, "cer": clean / 2}}
    if at_0_db is not None:
        run["test_by_snr"] = {"noise": "babble", "snr_db": {"0": {"wer": at_0_db, "cer": 0.0, "n": 4}}}
    return run


def test_the_fused_model_is_compared_with_each_stream_paired_by_seed(tmp_path):
    asr = [_noisy_run("asr", s, w, n) for s, w, n in [(0, 2.0, 40.0), (1, 3.0, 50.0), (2, 4.0, 60.0)]]
    avsr = [_noisy_run("avsr", s, w, n) for s, w, n in [(0, 3.0, 20.0), (1, 3.5, 25.0), (2, 3.0, 45.0)]]
    vsr = [_noisy_run("vsr", 1, 30.0)]  # one seed in common, no noisy decode
    differences = modality_differences(asr + vsr + avsr)
    by = {(tuple(d["modalities"]), d["field"]): d for d in differences}
    assert set(by) == {(("avsr", "asr"), "wer"), (("avsr", "asr"), "wer_at_0_db"), (("avsr", "vsr"), "wer")}
    noisy = by[("avsr", "asr"), "wer_at_0_db"]
    assert noisy["seeds"] == [0, 1, 2] and noisy["diffs"] == [-20.0, -25.0, -15.0]
    assert noisy["mean"] == -20.0 and noisy["interval"][0] < -20.0 < noisy["interval"][1] < 0
    assert by[("avsr", "asr"), "wer"]["diffs"] == [1.0, 0.5, -1.0]
    one = by[("avsr", "vsr"), "wer"]
    assert (one["seeds"], one["diffs"], one["interval"]) == ([1], [-26.5], None)  # one seed: no interval
    table = differences_table(differences)
    assert "| avsr − asr | 0, 1, 2 | +0.17 [" in table and "| avsr − vsr | 1 | -26.50 | – |" in table
    assert modality_differences(asr) == [] and differences_table([]) == ""
    write_seed_report(tmp_path, [0, 1, 2], 0, asr + avsr)
    assert json.loads((tmp_path / "results.json").read_text())["differences"] == modality_differences(asr + avsr)
    assert "| avsr − asr |" in (tmp_path / "results.md").read_text()
    write_seed_report(tmp_path, [0, 1, 2], 0, asr)
    assert "−" not in (tmp_path / "results.md").read_text()  # one modality: nothing to compare


def _tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def wav_utterances(tmp_path) -> list[Utterance]:
    utts = []
    for i in range(6):
        path = tmp_path / f"u{i}.wav"
        write_wav(path, _tone(1.0 + 0.1 * i, 200.0 + 90 * i))
        utts.append(Utterance(f"u{i}", None, str(path), f"word{i}", 25 + 2 * i))
    return utts


def test_a_swap_replaces_one_stream_and_names_its_donor(wav_utterances):
    dataset = AVSRDataset(wav_utterances[:3], "asr")
    clean = [dataset[i]["audio"] for i in range(3)]
    dataset.swap = ("audio", [1, 2, 0])
    item = dataset[0]
    assert np.array_equal(item["audio"], clean[1])
    assert item["audio_uid"] == "u1"
    assert item["uid"] == "u0"  # the transcript stays the utterance's own
    assert item["text"] == "word0"
    batch = AVSRCollator(_extractor())([dataset[0], dataset[1]])
    assert batch["audio_uids"] == ["u1", "u2"]


def test_the_feature_cache_serves_a_swapped_stream_by_its_donor():
    from peft import LoraConfig, get_peft_model

    from recipes.avsr.pipeline.lip_encoder import LipEncoderConfig, LipEncoderModel
    from recipes.avsr.pipeline.model import AVSRModel
    from recipes.avsr.pipeline.stand_ins import build_word_tokenizer, tiny_llm

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["a", "b"])
    llm = get_peft_model(
        tiny_llm(tokenizer, hidden_size=32, layers=1, heads=2), LoraConfig(r=2, task_type="CAUSAL_LM")
    )
    video_encoder = LipEncoderModel(LipEncoderConfig(stem_channels=4, channels=[8], hidden_size=24, num_layers=1))
    model = AVSRModel(llm, tokenizer, "vsr", video_encoder=video_encoder, projector_hidden=16)
    model.enable_feature_cache(True)
    frames = [np.random.default_rng(i).normal(size=(6, 16, 16)).astype(np.float32) for i in range(2)]
    items = [{"uid": f"u{i}", "text": "a", "video": f} for i, f in enumerate(frames)]
    _, own = model.encode(AVSRCollator()(items))
    swapped = [
        {**items[0], "video": frames[1], "video_uid": "u1"},
        {**items[1], "video": frames[0], "video_uid": "u0"},
    ]
    _, cached = model.encode(AVSRCollator()(swapped))
    # the projector reruns on the reordered batch: equal up to float rounding (which depends on the thread count)
    torch.testing.assert_close(cached[0][0], own[0][1])
    torch.testing.assert_close(cached[0][1], own[0][0])
    assert not torch.allclose(cached[0][0], own[0][0], atol=1e-3)  # the donor's stream, not the utterance's own


def _extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, chunk_length=2)


def test_mix_at_snr_gives_the_asked_snr():
    rng = np.random.default_rng(0)
    wave, noise = _tone(1.0, 300.0), rng.normal(size=16000)
    for target in (-5.0, 0.0, 7.5, 20.0):
        mixed = mix_at_snr(wave, noise, target)
        assert abs(snr_db(wave, mixed.astype(np.float64) - wave) - target) < 0.1


@pytest.mark.parametrize("target", [-5.0, 10.0])
def test_babble_at_decode_time_has_the_asked_snr_and_is_fixed(wav_utterances, target):
    config = LoaderConfig(test_snr_db=target, test_noise="babble")
    loader = make_loader(config, wav_utterances[:1], "asr", _extractor(), babble_from=wav_utterances[1:])
    clean = load_audio(wav_utterances[0].audio)
    noisy = loader.dataset[0]["audio"]
    assert abs(snr_db(clean, noisy.astype(np.float64) - clean) - target) < 0.1
    assert np.array_equal(loader.dataset[0]["audio"], noisy)  # the same babble at every decode
    assert parse_config(["--decode_snr_target", "5", "--decode_noise", "babble"]).loader.test_noise == ("babble")


def test_babble_is_several_other_utterances(wav_utterances):
    waves = {u.uid: load_audio(u.audio) for u in wav_utterances}
    bank = BabbleBank(waves, talkers=4)
    noise = bank.noise(8000, np.random.default_rng(0), exclude="u0")
    spectrum = np.abs(np.fft.rfft(noise))
    freqs = np.fft.rfftfreq(8000, 1 / 16000)
    peaks = {round(f) for f in freqs[np.argsort(spectrum)[-4:]]}
    assert len(peaks) == 4  # four talkers (tones) summed
    assert 200 not in peaks  # never the utterance's own (u0's tone)


def test_training_babble_draws_an_snr_per_utterance_and_epoch(wav_utterances):
    dataset = AVSRDataset(
        wav_utterances[:1],
        "asr",
        train=True,
        babble=BabbleBank({u.uid: load_audio(u.audio) for u in wav_utterances[1:]}),
        augment=Augmentation(snr_range=(3.0, 3.0)),
    )
    clean = load_audio(wav_utterances[0].audio)
    epoch0 = dataset[0]["audio"]
    assert abs(snr_db(clean, epoch0.astype(np.float64) - clean) - 3.0) < 0.1
    assert np.array_equal(dataset[0]["audio"], epoch0)  # fixed by (seed, epoch, uid): a resumed run sees the same
    dataset.set_epoch(1)
    assert not np.array_equal(dataset[0]["audio"], epoch0)


def test_augmentation_is_off_by_default(wav_utterances):
    config = parse_config([])
    assert config.loader.train_snr_range is None
    assert config.loader.time_mask is False
    loader = make_loader(LoaderConfig(), wav_utterances[:1], "asr", _extractor(), train=True)
    assert loader.dataset.augment is None
    assert np.array_equal(loader.dataset[0]["audio"], load_audio(wav_utterances[0].audio))


def test_augmentation_refuses_the_feature_cache():
    with pytest.raises(ValueError, match="--no-cache_features"):
        parse_config(["--time_mask", "--cache_features"])
    assert parse_config(["--train_snr_range", "-5", "20"]).model.cache_features is False


def test_time_mask_zeroes_spans_of_at_most_the_window():
    x = np.ones(250, dtype=np.float32)
    masked = time_mask(x, window=10, stride=25, rng=np.random.default_rng(0))
    assert masked.shape == x.shape
    assert set(np.unique(masked)) <= {0.0, 1.0}
    assert 0 < (masked == 0).sum() <= 10 * 10  # ceil(250 / 25) spans of at most 9 steps (overlaps allowed)
    assert np.array_equal(x, np.ones(250))  # the input is left as it was
    assert np.array_equal(time_mask(x, 10, 25, np.random.default_rng(0)), masked)


def test_time_masking_reaches_the_training_frames_and_audio(wav_utterances):
    dataset = AVSRDataset(wav_utterances[:1], "asr", train=True, augment=Augmentation(time_mask=True, seed=1))
    audio = dataset[0]["audio"]
    clean = load_audio(wav_utterances[0].audio)
    assert (audio == 0).sum() > (clean == 0).sum()
    assert np.array_equal(audio[audio != 0], clean[audio != 0])


def test_average_of_checkpoints_is_the_mean_of_the_saved_tensors(tmp_path):
    rng = torch.Generator().manual_seed(0)
    saved = [{"w": torch.randn(3, 4, generator=rng), "b": torch.randn(5, generator=rng)} for _ in range(3)]
    paths = []
    for i, state in enumerate(saved):
        (tmp_path / f"c{i}").mkdir()
        save_file(state, tmp_path / f"c{i}" / "trainable_0.safetensors")
        paths.append(tmp_path / f"c{i}")
    mean = average_checkpoints(paths)
    for key in ("w", "b"):
        assert torch.allclose(mean[key], torch.stack([s[key] for s in saved]).mean(0), atol=1e-7)
    assert torch.equal(average_checkpoints(paths[:1])["w"], saved[0]["w"])


def test_babble_options_leave_a_video_only_run_alone(tmp_path):
    from recipes.avsr.data.media import write_video

    frames = np.random.default_rng(0).integers(0, 255, size=(10, 48, 48), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames)
    utts = [Utterance("v", str(tmp_path / "v.mp4"), None, "word", 10)]
    config = LoaderConfig(crop_size=44, test_snr_db=0.0, test_noise="babble", train_snr_range=(-5.0, 20.0))
    assert make_loader(config, utts, "vsr").dataset[0]["video"].shape == (10, 44, 44)
    assert make_loader(config, utts, "vsr", train=True).dataset[0]["video"].shape == (10, 44, 44)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--average_last", "3"], "--checkpointing_steps"),
        (
            ["--average_last", "3", "--checkpointing_steps", "5", "--checkpoints_total_limit", "2"],
            "checkpoints_total_limit",
        ),
        (["--decode_noise", "babble"], "--decode_snr_target"),
        (["--decode_noise", "babble", "--test_snrs"], "--decode_snr_target <dB> or --test_snrs"),
        (["--train_snr_range", "5", "--no-cache_features"], "LOW HIGH"),
        (["--train_snr_range", "low", "high", "--no-cache_features"], "LOW HIGH"),
        (["--test_snrs", "nan"], "finite"),
        (["--seeds", "0", "1", "--eval_only", "--resume_from", "x"], "--seeds"),
        (["--seeds", "0", "0"], "repeated"),
        (
            ["--seeds", "0", "1", "--modality", "asr", "--resume_from_checkpoint", "ckpt"],
            "--resume_from_checkpoint latest",
        ),
        (["--train_snr_range", "20", "-5", "--no-cache_features"], "LOW <= HIGH"),
    ],
)
def test_control_options_that_cannot_work_are_refused_early(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_seeds_and_swaps_are_off_by_default():
    config = parse_config([])
    assert config.seeds is None
    assert config.eval.swap_controls is False
    assert config.train.average_last == 0
    assert config.train.val_utts == 0
    assert parse_config(["--seeds", "0", "1", "2"]).seeds == (0, 1, 2)


def test_time_masking_blacks_out_whole_training_frames(tmp_path):
    from recipes.avsr.data.dataset import LRS3_MEAN, LRS3_STD, VideoTransform
    from recipes.avsr.data.media import write_video

    write_video(tmp_path / "v.mp4", np.full((75, 48, 48), 200, dtype=np.uint8))
    utts = [Utterance("v", str(tmp_path / "v.mp4"), None, "word", 75)]
    transform = VideoTransform(crop_size=44)
    masked = AVSRDataset(utts, "vsr", transform, train=True, augment=Augmentation(time_mask=True))[0]["video"]
    clean = AVSRDataset(utts, "vsr", transform, train=True)[0]["video"]
    black = np.isclose(masked, -LRS3_MEAN / LRS3_STD).all(axis=(1, 2))
    assert 0 < black.sum() <= 3 * 9  # ceil(75 / 25) spans of at most 9 frames
    assert np.array_equal(masked[~black], clean[~black])
