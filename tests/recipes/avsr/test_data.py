"""AVSR recipe data: LRS3 layouts, decoding with real files, bad-file handling, bucketing, synthetic corpus."""

from pathlib import Path

import numpy as np
import pytest

from recipes.avsr.data.collate import AVSRCollator, audio_frames, matching_video_rate
from recipes.avsr.data.dataset import AVSRDataset, VideoTransform
from recipes.avsr.data.espeak import EspeakNG
from recipes.avsr.data.loader import LengthBucketSampler
from recipes.avsr.data.lrs3 import (
    Utterance,
    check_files,
    detect_layout,
    find_split_csv,
    probe_frame_counts,
    read_manifest,
    scan_auto_avsr,
    scan_raw_lrs3,
    write_manifest,
)
from recipes.avsr.data.media import (
    AUDIO_RATE,
    SAMPLES_PER_FRAME,
    AVSRDataError,
    load_audio,
    load_video,
    write_video,
    write_wav,
)
from recipes.avsr.data.synthetic import (
    SPEAKERS,
    SyntheticCorpusConfig,
    build_synthetic_corpus,
    mouth_trajectory,
    phoneme_visemes,
    render_mouth,
)
from recipes.avsr.pipeline.stand_ins import build_word_tokenizer


def _frames(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, size * size).reshape(size, size)
    return np.stack([np.clip(base + 10 * np.sin(t) + rng.normal(0, 2, base.shape), 0, 255) for t in range(n)]).astype(
        np.uint8
    )


def _tone(n_frames: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(n_frames * SAMPLES_PER_FRAME) / AUDIO_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _auto_avsr_root(tmp_path: Path) -> Path:
    """Three good utterances, one broken mp4, one utterance whose wav is missing (labels: 5-column CSV)."""
    root = tmp_path / "lrs3"
    rows = []
    for i, (spk, n) in enumerate([("spk1", 20), ("spk1", 30), ("spk2", 25), ("spk2", 22), ("spk3", 18)]):
        rel = f"lrs3_video_seg24s/trainval/{spk}/{i:05d}.mp4"
        video = root / "lrs3" / rel
        video.parent.mkdir(parents=True, exist_ok=True)
        if i == 3:
            video.write_bytes(b"this is not an mp4 file")
        else:
            write_video(video, _frames(n, seed=i))
        if i != 4:
            write_wav(video.with_suffix(".wav"), _tone(n))
        rows.append(f"lrs3,{rel},{n},12 34 56,HELLO WORLD {i}")
    (root / "labels").mkdir()
    (root / "labels" / "lrs3_train_transcript_lengths_seg24s.csv").write_text("\n".join(rows) + "\n")
    return root


def test_auto_avsr_manifest_and_decoding(tmp_path):
    root = _auto_avsr_root(tmp_path)
    assert detect_layout(root) == "auto_avsr"
    csv_name = find_split_csv(root, "train")
    utts = scan_auto_avsr(root, csv_name)
    assert [u.n_frames for u in utts] == [20, 30, 25, 22, 18]
    assert utts[0].text == "hello world 0"
    assert utts[0].speaker == "spk1"
    assert utts[0].audio.endswith(".wav")

    write_manifest(utts, tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == utts

    frames = load_video(utts[1].video)
    assert frames.shape == (30, 48, 48)
    assert frames.dtype == np.uint8
    assert np.abs(frames.astype(float) - _frames(30, seed=1)).mean() < 4  # lossy H.264, but close
    wave = load_audio(utts[1].audio)
    assert wave.shape == (30 * 640,)
    assert np.abs(wave - _tone(30)).max() < 1e-3


def test_missing_and_broken_files_are_reported_skipped_and_counted(tmp_path, caplog):
    utts = scan_auto_avsr(_auto_avsr_root(tmp_path), "lrs3_train_transcript_lengths_seg24s.csv")
    kept, problems = check_files(utts, "avsr")
    assert len(kept) == 4
    assert len(problems) == 1
    assert "00004.wav" in problems[0]  # the missing file is named
    assert len(check_files(utts, "vsr")[0]) == 5  # video-only does not need the wav

    with pytest.raises(AVSRDataError, match="00003.mp4"):
        load_video(utts[3].video)

    dataset = AVSRDataset(kept, "avsr", VideoTransform(crop_size=44))
    collate = AVSRCollator(_extractor())
    with caplog.at_level("WARNING"):
        batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["uids"] == [u.uid for u in kept if "00003" not in u.uid]
    assert collate.skipped == 1
    assert list(dataset.bad) == [kept[3].uid]
    assert "00003.mp4" in dataset.bad[kept[3].uid]
    assert "00003.mp4" in caplog.text
    assert batch["video"].shape == (3, 30, 44, 44)
    assert batch["video_lengths"].tolist() == [20, 30, 25]
    assert batch["audio_features"].shape[:2] == (3, 80)
    assert batch["audio_lengths"].tolist() == [40, 60, 50]  # 50 Hz encoder frames: 2 per video frame


def _empty_video(path: Path) -> None:
    """An mp4 written with no frame (PyAV then leaves the video stream out)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height = stream.width = 48
        stream.pix_fmt = "yuv420p"
        container.start_encoding()


def _cut_in_half(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


BAD_MEDIA = {  # kind -> (file it breaks, how, what the reason says); wrong-rate mp4 sound tracks are resampled
    "zero-byte video": ("mp4", lambda p: p.write_bytes(b""), "cannot decode video"),
    "zero-byte audio": ("wav", lambda p: p.write_bytes(b""), "cannot read audio"),
    "truncated video": ("mp4", _cut_in_half, "cannot decode video"),
    "truncated audio": ("wav", _cut_in_half, "is truncated"),
    "wrong sample rate": ("wav", lambda p: write_wav(p, _tone(20)[::2], rate=8000), "8000 Hz; resample it"),
    "video without frames": ("mp4", _empty_video, "has no frames"),
}


@pytest.mark.parametrize("kind", list(BAD_MEDIA))
def test_each_kind_of_bad_file_is_skipped_and_counted_with_its_reason(tmp_path, kind):
    suffix, spoil, reason = BAD_MEDIA[kind]
    video, audio = tmp_path / "u.mp4", tmp_path / "u.wav"
    write_video(video, _frames(20))
    write_wav(audio, _tone(20))
    spoil(video if suffix == "mp4" else audio)
    utterance = Utterance("u", str(video), str(audio), "hello", 20)
    dataset = AVSRDataset([utterance], "avsr", VideoTransform(crop_size=44))
    collate = AVSRCollator(_extractor())
    batch = collate([dataset[0]])
    assert collate.skipped == 1
    assert reason in batch["skipped"]["u"]
    assert str(video if suffix == "mp4" else audio) in dataset.bad["u"]  # the file is named


def test_error_names_a_missing_labels_file_and_bad_rows(tmp_path):
    with pytest.raises(AVSRDataError, match="labels"):
        scan_auto_avsr(tmp_path, "nope.csv")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "old_train.csv").write_text("lrs3,a/b/c.mp4,10,1 2 3\n")
    with pytest.raises(AVSRDataError, match="5-column"):
        scan_auto_avsr(tmp_path, "old_train.csv")
    with pytest.raises(AVSRDataError, match="does not exist"):
        detect_layout(tmp_path / "missing")


def _write_raw_mp4(path: Path, frames: np.ndarray, wave_48k: np.ndarray) -> None:
    """A raw-LRS3-like mp4: H.264 face video plus an AAC sound track at 48 kHz."""
    import av

    with av.open(str(path), "w") as container:
        vstream = container.add_stream("libx264", rate=25)
        vstream.height, vstream.width = frames.shape[1:]
        vstream.pix_fmt = "yuv420p"
        astream = container.add_stream("aac", rate=48000)
        astream.layout = "mono"
        for img in frames:
            container.mux(vstream.encode(av.VideoFrame.from_ndarray(img, format="gray")))
        for start in range(0, len(wave_48k), 1024):
            chunk = wave_48k[start : start + 1024][None]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            frame.sample_rate = 48000
            container.mux(astream.encode(frame))
        container.mux(vstream.encode())
        container.mux(astream.encode())


def test_raw_lrs3_layout_reads_text_and_sound_track(tmp_path):
    spk = tmp_path / "test" / "spkA"
    spk.mkdir(parents=True)
    t = np.arange(48000) / 48000
    _write_raw_mp4(spk / "00001.mp4", _frames(25, size=64), (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    (spk / "00001.txt").write_text("Text:  HELLO THERE, WORLD\nConf: 4\n")
    assert detect_layout(tmp_path) == "raw"
    (utt,) = scan_raw_lrs3(tmp_path, ["test"])
    assert utt.uid == "test/spkA/00001"
    assert utt.text == "hello there world"
    assert utt.audio == utt.video
    probe_frame_counts([utt])
    assert utt.n_frames == 25
    wave = load_audio(utt.audio)
    assert abs(len(wave) - 16000) < 2048  # one second, resampled to 16 kHz (AAC adds priming samples)
    spectrum = np.abs(np.fft.rfft(wave[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 300) < 5  # still a 300 Hz tone
    item = AVSRDataset([utt], "avsr", VideoTransform(crop_size=32, mouth_box=(20, 10, 40, 44)))[0]
    assert item["video"].shape == (25, 32, 32)
    assert item["audio"].shape == (25 * 640,)
    with pytest.raises(AVSRDataError, match="trainval"):
        scan_raw_lrs3(tmp_path, ["trainval"])


def test_length_bucket_sampler_budget_coverage_and_determinism():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 150, size=300).tolist()
    sampler = LengthBucketSampler(lengths, max_frames=600, max_batch_size=8, seed=3, bucket_size=64)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(300))  # every utterance exactly once
    assert all(max(lengths[i] for i in b) * len(b) <= 600 for b in batches)
    assert all(len(b) <= 8 for b in batches)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 30  # bucketing keeps similar lengths together (random batches would spread ~100)
    assert list(sampler) == batches  # same epoch, same order (resumable)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="longest"):
        LengthBucketSampler([10, 700], max_frames=600)


def test_phoneme_visemes_and_mouth_trajectory():
    assert phoneme_visemes("p") == ["bilabial"]
    assert phoneme_visemes("aI") == ["open", "spread"]
    assert phoneme_visemes("_:") == ["rest"]
    assert phoneme_visemes("u:") == ["round"]
    # "ma": lips shut around 0.1 s, wide open around 0.3 s
    traj = mouth_trajectory([(0.0, "_"), (0.08, "m"), (0.16, "a"), (0.44, "_")], n_frames=13)
    opening = traj[:, 0]
    assert opening[2] < 0.1
    assert opening[7] > 0.8
    frames = render_mouth(traj, SPEAKERS[0], np.random.default_rng(0))
    centre = frames[:, 24:29, 20:28].mean(axis=(1, 2))
    assert centre[7] < centre[2] - 40  # an open mouth shows the dark cavity


def test_espeak_synthesis_and_corpus_round_trip(tmp_path):
    tts = EspeakNG()
    wave, phonemes = tts.synthesize("place blue at f two now", "en-us+m3", 160, 50)
    assert tts.sample_rate == 22050
    assert len(wave) / 22050 > 0.8
    starts = [t for t, _ in phonemes]
    assert starts == sorted(starts)
    assert starts[-1] < len(wave) / 22050 + 0.05
    assert {"p", "b", "f", "t", "n"} <= {p for _, p in phonemes}

    cfg = SyntheticCorpusConfig(n_train=4, n_test=2, seed=1)
    root = build_synthetic_corpus(tmp_path / "corpus", cfg)
    assert detect_layout(root) == "auto_avsr"
    train = scan_auto_avsr(root, find_split_csv(root, "train"))
    test = scan_auto_avsr(root, find_split_csv(root, "test"))
    assert len(train) == 4
    assert len(test) == 2
    assert not {u.text for u in train} & {u.text for u in test}
    item = AVSRDataset(test, "avsr", VideoTransform(crop_size=44))[0]
    assert item["video"].shape == (test[0].n_frames, 44, 44)
    assert item["audio"].shape == (test[0].n_frames * 640,)
    assert np.abs(item["audio"]).max() > 0.05
    stamp = (root / "corpus.json").stat().st_mtime
    build_synthetic_corpus(root, cfg)  # same config: reused, not rebuilt
    assert (root / "corpus.json").stat().st_mtime == stamp


def _extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, chunk_length=4)


def test_stream_rates_and_transcript_tokens():
    assert audio_frames(SAMPLES_PER_FRAME * 10, hop_length=160) == 20  # 25 fps video, 50 Hz encoder frames
    assert audio_frames(SAMPLES_PER_FRAME * 10 + 1, hop_length=160) == 21  # a partial frame still counts
    assert [matching_video_rate(r) for r in (1, 2, 3, 16)] == [1, 1, 1, 8]
    tokenizer = build_word_tokenizer(["place", "blue"])
    batch = AVSRCollator(tokenizer=tokenizer)([{"uid": "u", "text": "place blue", "video": np.zeros((3, 8, 8))}])
    assert batch["transcript_ids"] == [tokenizer.convert_tokens_to_ids(["place", "blue"])]


def test_audio_longer_than_the_whisper_window_is_skipped_and_counted_not_cut(tmp_path):
    from transformers import WhisperFeatureExtractor

    from recipes.avsr.data.loader import LoaderConfig, make_loader
    from recipes.avsr.data.lrs3 import Utterance

    long_wav, short_wav = tmp_path / "long.wav", tmp_path / "short.wav"
    write_wav(long_wav, _tone(int(31 * 25)))  # 31 s: Whisper's extractor keeps 30 s
    write_wav(short_wav, _tone(50))
    utts = [
        Utterance("long", None, str(long_wav), "a long one", 775),
        Utterance("short", None, str(short_wav), "b", 50),
    ]
    extractor = WhisperFeatureExtractor()  # the real 30 s window, 80 mels
    loader = make_loader(LoaderConfig(crop_size=None), utts, "asr", extractor, train=False)
    batches = list(loader)
    assert [u for b in batches for u in b["uids"]] == ["short"]
    skipped = {k: v for b in batches for k, v in b["skipped"].items()}
    assert list(skipped) == ["long"]
    assert "31.0 s" in skipped["long"]
    assert "segment" in skipped["long"]  # the fix is named
    assert list(loader.dataset.bad) == ["long"]


def test_raw_face_videos_without_a_mouth_box_warn():
    import warnings

    from recipes.avsr.data.lrs3 import check_mouth_crop

    with pytest.warns(UserWarning, match="--mouth_box"):
        check_mouth_crop("raw", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_mouth_crop("raw", (10, 10, 40, 40))  # a mouth box is given
        check_mouth_crop("auto_avsr", None)  # already mouth crops
        check_mouth_crop("raw", None, uses_video=False)  # asr reads only the sound track


def test_skipped_files_are_counted_in_the_batches_with_workers(tmp_path):
    from recipes.avsr.data.loader import LoaderConfig, make_loader

    utts = scan_auto_avsr(_auto_avsr_root(tmp_path), "lrs3_train_transcript_lengths_seg24s.csv")
    config = LoaderConfig(crop_size=44, num_workers=2, max_batch_size=2)
    loader = make_loader(config, utts, "avsr", _extractor(), train=True)
    batches = list(loader)
    skipped = {k: v for b in batches for k, v in b["skipped"].items()}
    assert len(skipped) == 1  # 00003.mp4 is broken (00004, its wav missing, is dropped by make_loader)
    assert "00003.mp4" in next(iter(skipped.values()))
    assert sorted(u for b in batches for u in b["uids"]) == sorted(u.uid for u in utts[:3])
    assert loader.dataset.bad == {utts[4].uid: f"{utts[4].uid}: missing file {utts[4].audio}"}


def test_no_utterance_with_its_files_is_an_error_naming_them(tmp_path):
    from recipes.avsr.data.loader import LoaderConfig, make_loader
    from recipes.avsr.data.lrs3 import Utterance

    utts = [Utterance(f"u{i}", str(tmp_path / f"{i}.mp4"), str(tmp_path / f"{i}.wav"), "x", 10) for i in range(3)]
    with pytest.raises(AVSRDataError, match="none of the 3 training utterances") as err:
        make_loader(LoaderConfig(), utts, "avsr", _extractor(), train=True)
    assert str(tmp_path / "0.mp4") in str(err.value)
    assert "3 missing" in str(err.value)


def test_a_video_without_an_audio_track_names_the_problem(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, _frames(10))
    with pytest.raises(AVSRDataError, match="no audio track") as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_the_corpus_figure_is_made_by_a_command(tmp_path):
    from PIL import Image

    from recipes.avsr.reports.figures import main as figures

    out = tmp_path / "corpus.png"
    figures(["--corpus", str(tmp_path / "corpus"), "--out", str(out), "--corpus_train", "2", "--corpus_test", "2"])
    width, height = Image.open(out).size
    assert width == 840
    assert height > 300  # two utterances, each a log-mel and a row of mouth frames


def test_decode_snr_target_adds_fixed_noise_to_the_test_audio_only(tmp_path):
    from recipes.avsr.data.loader import LoaderConfig, make_loader
    from recipes.avsr.data.lrs3 import Utterance
    from recipes.avsr.pipeline.config.cli import parse_config

    assert parse_config(["--decode_snr_target", "5"]).loader.test_snr_db == 5.0
    write_wav(tmp_path / "a.wav", _tone(50))
    utts = [Utterance("a", None, str(tmp_path / "a.wav"), "x", 50)]
    clean = next(iter(make_loader(LoaderConfig(), utts, "asr", _extractor(), train=False)))
    noisy_loader = make_loader(LoaderConfig(test_snr_db=0.0), utts, "asr", _extractor(), train=False)
    train_loader = make_loader(LoaderConfig(test_snr_db=0.0), utts, "asr", _extractor(), train=True)
    wave, noisy = load_audio(tmp_path / "a.wav"), noisy_loader.dataset[0]["audio"]
    snr = 10 * np.log10(np.mean(wave**2) / np.mean((noisy - wave) ** 2))
    assert abs(snr) < 0.3  # 0 dB: as much noise as signal
    assert np.array_equal(noisy_loader.dataset[0]["audio"], noisy)  # the same noise at every decode
    assert np.array_equal(train_loader.dataset[0]["audio"], wave)  # training audio stays clean
    assert not np.allclose(next(iter(noisy_loader))["audio_features"], clean["audio_features"])
