"""Data for the AVSR recipe: the LRS3 layouts, a manifest, length-bucketed batches, and a small synthetic corpus.

Two on-disk layouts are read (SPEC §4):

* **auto_avsr** (preprocessed LRS3): ``root/labels/*.csv``, rows ``dataset,rel_path,n_video_frames,token_ids,text``;
  the mouth-crop video is ``root/<dataset>/<rel_path>`` (``.mp4``) and its 16 kHz audio the same-stem ``.wav``.
* **raw** LRS3: ``root/{pretrain,trainval,test}/<speaker>/<utt>.mp4`` (face video with its audio track) and
  ``<utt>.txt`` whose first line is ``Text: ...``.

Files are decoded with maintained libraries (PyAV for mp4, soundfile for wav). A file that cannot be read raises
:class:`AVSRDataError` naming it; the dataset reports such an utterance, skips it and counts it, so one bad file
never silently kills a long run.

The embedded corpus (:func:`build_synthetic_corpus`) is GRID-like: six-word commands from a 34-word vocabulary, spoken
by espeak-ng voices (real synthesized speech) with a grayscale mouth-region video whose lip shapes follow the
phoneme timings espeak-ng reports, so both the audio and the lips carry the words. It is written in the auto_avsr
layout and read back through the same loader as LRS3.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

AUDIO_RATE = 16_000  # Hz, what every audio encoder here expects
VIDEO_FPS = 25  # frames per second of LRS3 and of the synthetic corpus
SAMPLES_PER_FRAME = AUDIO_RATE // VIDEO_FPS  # 640 audio samples per video frame
LRS3_MEAN, LRS3_STD = 0.421, 0.165  # auto_avsr's grayscale normalisation of mouth crops


class AVSRDataError(RuntimeError):
    """A file of the corpus is missing or cannot be decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    """One manifest row: where the streams of an utterance are and what is said."""

    uid: str
    video: str | None
    audio: str | None  # a .wav, or the .mp4 itself when the audio is its sound track (raw LRS3)
    text: str
    n_frames: int  # video frames at 25 fps (used for bucketing); 0 if unknown
    speaker: str = ""


def normalize_text(text: str) -> str:
    """Lower-case, keep letters, digits and apostrophes, collapse spaces (how WER is scored)."""
    kept = "".join(c if (c.isalnum() or c in "' ") else " " for c in text.lower())
    return " ".join(kept.split())


def write_manifest(utterances: Sequence[Utterance], path: str | Path) -> None:
    """Write one JSON object per line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for u in utterances:
            f.write(json.dumps(asdict(u)) + "\n")


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a manifest written by :func:`write_manifest`."""
    with open(path, encoding="utf-8") as f:
        return [Utterance(**json.loads(line)) for line in f if line.strip()]


def check_files(utterances: list[Utterance], modality: str) -> tuple[list[Utterance], list[str]]:
    """Keep utterances whose needed files exist; return them and one message per dropped utterance."""
    need_video, need_audio = modality in ("vsr", "avsr"), modality in ("asr", "avsr")
    kept, problems = [], []
    for u in utterances:
        missing = [
            p for p, need in ((u.video, need_video), (u.audio, need_audio)) if need and not (p and os.path.isfile(p))
        ]
        if missing:
            problems.append(f"{u.uid}: missing file {missing[0]}")
        else:
            kept.append(u)
    return kept, problems


def scan_auto_avsr(root: str | Path, csv_name: str) -> list[Utterance]:
    """Read an auto_avsr labels CSV (``root/labels/<csv_name>``) into utterances.

    Rows are ``dataset,rel_path,n_video_frames,token_ids,text`` (the five-column form that carries the text, as in
    Llama-AVSR); the video is ``root/dataset/rel_path`` and the audio the same-stem ``.wav``.
    """
    root = Path(root)
    path = root / "labels" / csv_name
    if not path.is_file():
        raise AVSRDataError(f"labels file {path} not found; expected auto_avsr labels under {root / 'labels'}")
    utterances = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) < 5:
                raise AVSRDataError(
                    f"{path}, line {i + 1}: {len(row)} columns; this loader needs `dataset,rel_path,n_video_frames,"
                    "token_ids,text` (the 5-column labels with text that Llama-AVSR uses)"
                )
            dataset, rel_path, n_frames, text = row[0], row[1], row[2], ",".join(row[4:])
            video = root / dataset / rel_path
            parts = Path(rel_path).with_suffix("").parts
            utterances.append(
                Utterance(
                    uid="/".join(parts[-3:]),
                    video=str(video),
                    audio=str(video.with_suffix(".wav")),
                    text=normalize_text(text),
                    n_frames=int(n_frames),
                    speaker=parts[-2] if len(parts) >= 2 else "",
                )
            )
    return utterances


def _read_raw_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first.startswith("Text:"):
        raise AVSRDataError(f"{path}: first line should start with 'Text:' (raw LRS3 transcript), got {first[:40]!r}")
    return normalize_text(first[len("Text:") :])


def scan_raw_lrs3(root: str | Path, subsets: Sequence[str]) -> list[Utterance]:
    """Read raw LRS3 folders ``root/<subset>/<speaker>/<utt>.mp4`` + ``<utt>.txt``; audio is the mp4's sound track."""
    root = Path(root)
    utterances = []
    for subset in subsets:
        folder = root / subset
        if not folder.is_dir():
            raise AVSRDataError(f"raw LRS3 folder {folder} not found (expected {root}/{{pretrain,trainval,test}})")
        for txt in sorted(folder.glob("*/*.txt")):
            mp4 = txt.with_suffix(".mp4")
            utterances.append(
                Utterance(
                    uid=f"{subset}/{txt.parent.name}/{txt.stem}",
                    video=str(mp4),
                    audio=str(mp4),
                    text=_read_raw_text(txt),
                    n_frames=0,
                    speaker=txt.parent.name,
                )
            )
    return utterances


def probe_frame_counts(utterances: Sequence[Utterance]) -> None:
    """Fill unknown ``n_frames`` from the video headers (PyAV; no decoding), for length bucketing."""
    import av

    for u in utterances:
        if u.n_frames or not u.video or not os.path.isfile(u.video):
            continue
        try:
            with av.open(u.video) as container:
                stream = container.streams.video[0]
                u.n_frames = stream.frames or int(float(stream.duration * stream.time_base) * VIDEO_FPS)
        except (OSError, av.error.FFmpegError, IndexError, TypeError):
            u.n_frames = 0  # decoding will report the file


def detect_layout(root: str | Path) -> str:
    """``"auto_avsr"`` when ``root/labels`` holds CSVs, ``"raw"`` when it holds LRS3 subset folders."""
    root = Path(root)
    if not root.is_dir():
        raise AVSRDataError(f"data directory {root} does not exist")
    if any((root / "labels").glob("*.csv")):
        return "auto_avsr"
    if any((root / s).is_dir() for s in ("trainval", "test", "pretrain")):
        return "raw"
    raise AVSRDataError(
        f"{root} is neither auto_avsr-preprocessed LRS3 (labels/*.csv) nor raw LRS3 ({{pretrain,trainval,test}}/)"
    )


def find_split_csv(root: str | Path, split: str) -> str:
    """The single CSV in ``root/labels`` whose name contains ``split`` (``train``/``val``/``test``)."""
    names = sorted(p.name for p in (Path(root) / "labels").glob("*.csv") if split in p.name)
    if len(names) != 1:
        raise AVSRDataError(
            f"expected exactly one labels CSV containing {split!r} in {Path(root) / 'labels'}, found {names}; "
            f"pass --{split}_csv"
        )
    return names[0]


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


def load_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video as grayscale ``uint8 [T, H, W]`` with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    except (OSError, av.error.FFmpegError, ValueError, IndexError) as err:
        raise AVSRDataError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise AVSRDataError(f"video {path} has no frames")
    return np.stack(frames)


def load_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz: a ``.wav`` through soundfile, an ``.mp4`` sound track through PyAV."""
    path = str(path)
    if path.endswith(".mp4"):
        return _load_mp4_audio(path)
    import soundfile

    try:
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise AVSRDataError(f"cannot read audio {path}: {err}") from err
    if rate != AUDIO_RATE:
        raise AVSRDataError(
            f"audio {path} is {rate} Hz; resample it to {AUDIO_RATE} Hz (auto_avsr's preprocessing does)"
        )
    if wave.shape[0] == 0:
        raise AVSRDataError(f"audio {path} is empty")
    return wave.mean(axis=1)


def _load_mp4_audio(path: str) -> np.ndarray:
    import av

    try:
        with av.open(path) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks = []
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (OSError, av.error.FFmpegError, ValueError, IndexError) as err:
        raise AVSRDataError(f"cannot decode the audio track of {path}: {err}") from err
    if not chunks:
        raise AVSRDataError(f"{path} has no audio samples")
    return np.concatenate(chunks).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset, bucketing, collation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VideoTransform:
    """Grayscale crop + normalisation of auto_avsr: ``uint8 [T, H, W]`` → ``float32 [T, crop, crop]``.

    ``mouth_box`` (top, left, height, width) first cuts a fixed region (for raw LRS3 face videos, which are not
    mouth crops); ``crop_size`` then centre-crops (a random crop when ``train`` and ``random_crop``).
    """

    crop_size: int | None = 88
    mouth_box: tuple[int, int, int, int] | None = None
    random_crop: bool = False

    def __call__(self, frames: np.ndarray, train: bool = False, rng: random.Random | None = None) -> np.ndarray:
        if self.mouth_box is not None:
            top, left, h, w = self.mouth_box
            frames = frames[:, top : top + h, left : left + w]
        if self.crop_size is not None:
            _, h, w = frames.shape
            c = self.crop_size
            if h < c or w < c:
                raise AVSRDataError(f"video frames {h}x{w} are smaller than crop_size {c}")
            if train and self.random_crop:
                rng = rng or random
                top, left = rng.randint(0, h - c), rng.randint(0, w - c)
            else:
                top, left = (h - c) // 2, (w - c) // 2
            frames = frames[:, top : top + c, left : left + c]
        return ((frames.astype(np.float32) / 255.0) - LRS3_MEAN) / LRS3_STD


def cut_or_pad(wave: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad ``wave`` to ``n`` samples (keeps audio and video the same length, as auto_avsr does)."""
    return wave[:n] if wave.shape[0] >= n else np.pad(wave, (0, n - wave.shape[0]))


_DECODED: dict[tuple[str, str], np.ndarray] = {}  # (loader, path) -> decoded stream, filled by preloading datasets


class AVSRDataset(Dataset):
    """Decodes an utterance's streams on access; an unreadable utterance yields ``None`` and is counted.

    Args:
        utterances: manifest rows.
        modality: ``"asr"``, ``"vsr"`` or ``"avsr"``: which streams are decoded.
        video_transform: crop/normalisation of the frames.
        train: whether augmentation (random crop) applies.
        preload: decode everything once now (fast epochs on small corpora; bad files are found up front). Decoded
            files are kept for the whole process, so later datasets over the same files (another modality, the test
            set again) do not decode them again.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        modality: str,
        video_transform: VideoTransform | None = None,
        train: bool = False,
        preload: bool = False,
    ):
        if modality not in ("asr", "vsr", "avsr"):
            raise ValueError(f"modality must be 'asr', 'vsr' or 'avsr', got {modality!r}")
        self.utterances = list(utterances)
        self.modality = modality
        self.video_transform = video_transform or VideoTransform()
        self.train = train
        self.bad: dict[str, str] = {}  # uid -> reason, for the report
        self._cache: dict[int, dict | None] | None = None
        self._memo = _DECODED if preload else None
        if preload:
            from tqdm.auto import tqdm

            self._cache = {i: self._decode(i) for i in tqdm(range(len(self)), desc="decoding", leave=False)}

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def lengths(self) -> list[int]:
        """Video frames per utterance (25 fps), for bucketing."""
        return [max(u.n_frames, 1) for u in self.utterances]

    def _decode(self, index: int) -> dict | None:
        """The raw streams of one utterance (uint8 frames, float32 samples), or None if a file is unreadable."""
        u = self.utterances[index]
        try:
            item: dict = {"uid": u.uid, "text": u.text}
            if self.modality in ("vsr", "avsr"):
                item["frames"] = self._load(load_video, u.video)
            if self.modality in ("asr", "avsr"):
                wave = self._load(load_audio, u.audio)
                if "frames" in item:  # align lengths: 640 samples per frame
                    wave = cut_or_pad(wave, item["frames"].shape[0] * SAMPLES_PER_FRAME)
                item["audio"] = wave
            return item
        except AVSRDataError as err:
            if u.uid not in self.bad:
                logger.warning("skipping %s: %s", u.uid, err)
            self.bad[u.uid] = str(err)
            return None

    def _load(self, loader, path: str) -> np.ndarray:
        if self._memo is None:
            return loader(path)
        key = (loader.__name__, path)
        if key not in self._memo:
            self._memo[key] = loader(path)
        return self._memo[key]

    def __getitem__(self, index: int) -> dict | None:
        raw = self._cache[index] if self._cache is not None else self._decode(index)
        if raw is None:
            return None
        item = {k: v for k, v in raw.items() if k != "frames"}
        if "frames" in raw:
            try:
                item["video"] = self.video_transform(raw["frames"], train=self.train)
            except AVSRDataError as err:
                self.bad[raw["uid"]] = str(err)
                logger.warning("skipping %s: %s", raw["uid"], err)
                return None
        return item


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length under a frame budget (Llama-AVSR batches by frames), reshuffled each epoch.

    Utterances are sorted by length inside random buckets of ``bucket_size`` consecutive (shuffled) items, cut
    into batches whose ``max_len * batch_size`` stays within ``max_frames`` and ``batch_size <= max_batch_size``;
    the batch order is shuffled. The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_frames: int,
        max_batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int = 256,
    ):
        if max_frames < max(lengths, default=1):
            raise ValueError(f"max_frames={max_frames} is smaller than the longest utterance ({max(lengths)} frames)")
        self.lengths = list(lengths)
        self.max_frames, self.max_batch_size = max_frames, max_batch_size
        self.shuffle, self.seed, self.bucket_size = shuffle, seed, bucket_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        buckets = [order[i : i + self.bucket_size] for i in range(0, len(order), self.bucket_size)]
        batches: list[list[int]] = []
        for bucket in buckets:
            bucket.sort(key=lambda i: self.lengths[i])
            batch: list[int] = []
            for i in bucket:
                longest = max([self.lengths[j] for j in batch] + [self.lengths[i]])
                if batch and (longest * (len(batch) + 1) > self.max_frames or len(batch) >= self.max_batch_size):
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


@dataclass
class AVSRCollator:
    """Pads a list of dataset items into a batch; ``None`` items (unreadable files) are dropped and counted.

    Audio becomes log-mel features through ``feature_extractor`` (a transformers ``WhisperFeatureExtractor``: the
    encoder needs its fixed input length) plus the number of valid 50 Hz encoder frames; video is padded in time.
    """

    feature_extractor: object | None = None
    skipped: int = field(default=0, init=False)

    def __call__(self, items: list[dict | None]) -> dict:
        good = [it for it in items if it is not None]
        self.skipped += len(items) - len(good)
        batch: dict = {"uids": [it["uid"] for it in good], "texts": [it["text"] for it in good]}
        if not good:
            return batch
        if "audio" in good[0]:
            if self.feature_extractor is None:
                raise ValueError("the batch has audio but the collator has no feature_extractor")
            waves = [it["audio"] for it in good]
            feats = self.feature_extractor(waves, sampling_rate=AUDIO_RATE, return_tensors="pt", padding="max_length")
            batch["audio_features"] = feats.input_features  # B, n_mels, fixed length
            hop = self.feature_extractor.hop_length
            max_frames = feats.input_features.shape[-1] // 2
            # 2 mel hops per encoder frame (Whisper's stride-2 conv): 50 Hz at 16 kHz with hop 160
            batch["audio_lengths"] = torch.tensor([min(math.ceil(len(w) / hop / 2), max_frames) for w in waves])
        if "video" in good[0]:
            lengths = [it["video"].shape[0] for it in good]
            t_max, (h, w) = max(lengths), good[0]["video"].shape[1:]
            video = torch.zeros(len(good), t_max, h, w)
            for b, it in enumerate(good):
                video[b, : lengths[b]] = torch.from_numpy(it["video"])
            batch["video"] = video  # B, T, H, W
            batch["video_lengths"] = torch.tensor(lengths)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic corpus: espeak-ng speech + phoneme-timed mouth video
# ---------------------------------------------------------------------------------------------------------------------

# GRID-like grammar (Cooke et al. 2006): command colour preposition letter digit adverb
GRAMMAR: dict[str, list[str]] = {
    "command": ["bin", "lay", "place", "set"],
    "colour": ["blue", "green", "red", "white"],
    "preposition": ["at", "by", "in", "with"],
    "letter": ["a", "e", "f", "l", "o", "q", "r", "u"],
    "digit": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "adverb": ["again", "now", "please", "soon"],
}


@dataclass(frozen=True)
class Speaker:
    """A synthetic talker: an espeak-ng voice and a face (tones, mouth size, lip thickness in pixels at 48 px)."""

    name: str
    voice: str
    rate: int  # words per minute
    pitch: int  # 0..99
    skin: float
    lip: float
    mouth_width: float
    lip_thickness: float


SPEAKERS: list[Speaker] = [
    Speaker("s01", "en-us+m3", 165, 40, 0.62, 0.38, 1.00, 3.0),
    Speaker("s02", "en-us+f2", 175, 65, 0.74, 0.48, 0.90, 2.5),
    Speaker("s03", "en+m1", 155, 35, 0.55, 0.33, 1.08, 3.5),
    Speaker("s04", "en-gb-x-rp+f4", 180, 70, 0.70, 0.42, 0.94, 2.8),
    Speaker("s05", "en-gb-scotland+m5", 160, 50, 0.66, 0.40, 1.04, 3.2),
    Speaker("s06", "en-029+f3", 170, 60, 0.58, 0.36, 0.96, 2.6),
]

# Mouth shape per viseme class: (opening, width, teeth visible, tongue visible), each in [0, 1].
_VISEMES: dict[str, tuple[float, float, float, float]] = {
    "rest": (0.05, 0.50, 0.0, 0.0),
    "bilabial": (0.00, 0.45, 0.0, 0.0),  # p b m: lips pressed
    "labiodental": (0.12, 0.55, 0.9, 0.0),  # f v: upper teeth on lower lip
    "dental": (0.30, 0.60, 0.6, 1.0),  # th: tongue between teeth
    "alveolar": (0.22, 0.62, 0.9, 0.3),  # t d n l s z
    "postalveolar": (0.28, 0.25, 0.7, 0.0),  # sh zh ch j: lips pushed out
    "velar": (0.40, 0.50, 0.3, 0.0),  # k g ng h
    "round": (0.12, 0.08, 0.0, 0.0),  # w, u
    "r": (0.22, 0.30, 0.2, 0.0),
    "spread": (0.20, 0.90, 0.8, 0.0),  # i, j
    "open": (0.95, 0.60, 0.2, 0.2),  # a
    "mid": (0.55, 0.65, 0.4, 0.1),  # e, schwa
    "o": (0.60, 0.22, 0.0, 0.0),  # o
}
_CONSONANTS = {
    **dict.fromkeys(["p", "b", "m"], "bilabial"),
    **dict.fromkeys(["f", "v"], "labiodental"),
    **dict.fromkeys(["T", "D"], "dental"),
    **dict.fromkeys(["t", "d", "n", "l", "s", "z", "t#", "d#"], "alveolar"),
    **dict.fromkeys(["S", "Z", "tS", "dZ"], "postalveolar"),
    **dict.fromkeys(["k", "g", "N", "h", "x", "?"], "velar"),
    "w": "round",
    "r": "r",
    "j": "spread",
}
_VOWEL_START = {"a": "open", "A": "open", "V": "open", "e": "mid", "E": "mid", "@": "mid", "3": "mid", "i": "spread",
                "I": "spread", "o": "o", "O": "o", "0": "o", "u": "round", "U": "round"}  # fmt: skip


def phoneme_visemes(phoneme: str) -> list[str]:
    """Viseme class(es) of an espeak-ng phoneme mnemonic; diphthongs (``aI``, ``oU``…) give two."""
    p = phoneme.strip("'%=,:")
    if not p or p.startswith("_"):
        return ["rest"]
    if p in _CONSONANTS:
        return [_CONSONANTS[p]]
    if p[0] in _CONSONANTS and p[0] not in _VOWEL_START:
        return [_CONSONANTS[p[0]]]
    first = _VOWEL_START.get(p[0], "mid")
    second = next((_VOWEL_START[c] for c in p[1:] if c in _VOWEL_START and c not in "@"), None)
    return [first, second] if second and second != first else [first]


class EspeakNG:
    """espeak-ng through its C library (``libespeak-ng``, Debian package ``espeak-ng``): audio plus phoneme timings.

    The command line offers phoneme timings only with MBROLA voices; the library reports a phoneme event with its
    audio position for every phoneme of any voice.
    """

    _EVENT_WORD, _EVENT_PHONEME = 1, 7

    class _Event(ctypes.Structure):
        class _Id(ctypes.Union):
            _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

        _fields_ = [
            ("type", ctypes.c_int),
            ("unique_identifier", ctypes.c_uint),
            ("text_position", ctypes.c_int),
            ("length", ctypes.c_int),
            ("audio_position", ctypes.c_int),
            ("sample", ctypes.c_int),
            ("user_data", ctypes.c_void_p),
            ("id", _Id),
        ]

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as err:
            raise RuntimeError(
                "the embedded corpus needs espeak-ng's library: `apt-get install espeak-ng` (scripts/setup.sh does it)"
            ) from err
        # AUDIO_OUTPUT_SYNCHRONOUS=2; options: PHONEME_EVENTS | DONT_EXIT
        self.sample_rate = self._lib.espeak_Initialize(2, 500, None, 0x0001 | 0x8000)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed: is espeak-ng-data installed?")
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(self._Event)
        )
        self._callback = callback_type(self._on_audio)  # keep a reference: the library calls it later
        self._lib.espeak_SetSynthCallback(self._callback)
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[tuple[float, str]] = []

    def _on_audio(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:
            if events[i].type == self._EVENT_PHONEME:
                self._phonemes.append(
                    (events[i].audio_position / 1000.0, events[i].id.string.decode(errors="replace"))
                )
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, list[tuple[float, str]]]:
        """Speak ``text``; returns float32 samples at :attr:`sample_rate` and ``(start_seconds, phoneme)`` pairs."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (see `espeak-ng --voices=en`)")
        self._lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE
        self._lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
        self._chunks, self._phonemes = [], []
        data = text.encode() + b"\0"
        # position 0, POS_CHARACTER=1, end 0, flags espeakCHARS_UTF8=1
        self._lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)
        self._lib.espeak_Synchronize()
        wave = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
        return wave, list(self._phonemes)


def mouth_trajectory(phonemes: list[tuple[float, str]], n_frames: int) -> np.ndarray:
    """Per-frame mouth parameters ``[n_frames, 4]`` (opening, width, teeth, tongue) from timed phonemes.

    Each phoneme puts its viseme target(s) inside its time span; frames interpolate linearly between targets, a
    simple model of coarticulation.
    """
    times, targets = [0.0], [_VISEMES["rest"]]
    for k, (start, ph) in enumerate(phonemes):
        end = phonemes[k + 1][0] if k + 1 < len(phonemes) else start + 0.08
        vis = phoneme_visemes(ph)
        for j, v in enumerate(vis):
            times.append(start + (end - start) * (j + 1) / (len(vis) + 1))
            targets.append(_VISEMES[v])
    t = (np.arange(n_frames) + 0.5) / VIDEO_FPS
    arr = np.asarray(targets)
    order = np.argsort(times, kind="stable")
    ts = np.asarray(times)[order]
    return np.stack([np.interp(t, ts, arr[order, c]) for c in range(arr.shape[1])], axis=1)


def _soft(inside: np.ndarray, sharpness: float = 6.0) -> np.ndarray:
    """Soft mask from an implicit function that is > 0 inside (anti-aliased edges)."""
    return 1.0 / (1.0 + np.exp(np.clip(-sharpness * inside, -50.0, 50.0)))


def render_mouth(params: np.ndarray, speaker: Speaker, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Draw grayscale lower-face frames ``uint8 [T, size, size]``: skin, lips, mouth cavity, teeth and tongue."""
    s = size / 48.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    gain = rng.uniform(0.85, 1.15)
    # slow head motion: a random walk of the mouth centre, in pixels
    drift = np.cumsum(rng.normal(0, 0.25 * s, size=(len(params), 2)), axis=0)
    drift = np.clip(drift - drift.mean(0), -2.5 * s, 2.5 * s)
    frames = np.empty((len(params), size, size), np.float32)
    shade = 1.0 - 0.25 * (yy / size - 0.4) ** 2 - 0.15 * ((xx - size / 2) / size) ** 2  # cheeks and chin shading
    for f, (opening, width, teeth, tongue) in enumerate(params):
        cy, cx = size * 0.55 + drift[f, 0], size * 0.5 + drift[f, 1]
        half_w = s * speaker.mouth_width * (9.0 + 6.0 * width)
        inner_h = s * (0.3 + 8.0 * opening)
        outer_h = inner_h + s * speaker.lip_thickness * (1.3 - 0.5 * opening)
        outer = 1.0 - ((xx - cx) / (half_w + s)) ** 2 - ((yy - cy) / outer_h) ** 2
        inner = 1.0 - ((xx - cx) / (0.85 * half_w)) ** 2 - ((yy - cy) / max(inner_h, 1e-3)) ** 2
        lips, cavity = _soft(outer * 4), _soft(inner * 4) * min(1.0, opening * 6.0)
        img = speaker.skin * shade
        img = img * (1 - lips) + speaker.lip * lips
        inside = np.full_like(img, 0.08)
        teeth_band = _soft((cy - inner_h * 0.35 - yy) / s, 3.0) * teeth  # upper teeth under the upper lip
        inside = inside * (1 - teeth_band) + 0.88 * teeth_band
        tongue_blob = _soft((yy - (cy + inner_h * 0.2)) / s, 3.0) * tongue
        inside = inside * (1 - tongue_blob) + 0.45 * tongue_blob
        frames[f] = img * (1 - cavity) + inside * cavity
    frames = frames * gain + rng.normal(0, 0.025, size=frames.shape)
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Encode grayscale ``uint8 [T, H, W]`` frames as H.264 mp4 with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_wav(path: str | Path, wave: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Write 16-bit PCM with soundfile."""
    import soundfile

    soundfile.write(str(path), wave, rate, subtype="PCM_16")


def _resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(wave, rate_out // g, rate_in // g).astype(np.float32)


def random_sentence(rng: random.Random) -> str:
    """One sentence of the grammar."""
    return " ".join(rng.choice(words) for words in GRAMMAR.values())


@dataclass
class SyntheticCorpusConfig:
    """Size and shape of the embedded corpus."""

    n_train: int = 1200
    n_test: int = 120
    frame_size: int = 48
    noise_snr_db: tuple[float, float] = (15.0, 30.0)
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps([asdict(self), [asdict(s) for s in SPEAKERS], GRAMMAR, sorted(_VISEMES.items())])
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def synthesize_utterance(
    tts: EspeakNG, text: str, speaker: Speaker, rng: np.random.Generator, cfg: SyntheticCorpusConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Speech (16 kHz float32) and mouth frames (uint8 [T, H, W], 25 fps) of one sentence, time-aligned."""
    rate = int(speaker.rate * rng.uniform(0.9, 1.1))
    pitch = int(np.clip(speaker.pitch + rng.integers(-8, 9), 0, 99))
    wave, phonemes = tts.synthesize(text, speaker.voice, rate, pitch)
    lead = float(rng.uniform(0.05, 0.25))  # silence before speech starts
    wave = _resample(wave, tts.sample_rate, AUDIO_RATE)
    wave = np.concatenate([np.zeros(int(lead * AUDIO_RATE), np.float32), wave])
    n_frames = math.ceil(len(wave) / SAMPLES_PER_FRAME)
    wave = cut_or_pad(wave, n_frames * SAMPLES_PER_FRAME)
    snr = rng.uniform(*cfg.noise_snr_db)
    power = float(np.mean(wave**2)) + 1e-8
    wave = wave + rng.normal(0, math.sqrt(power / 10 ** (snr / 10)), size=wave.shape).astype(np.float32)
    wave = np.clip(wave, -1, 1).astype(np.float32)
    frames = render_mouth(
        mouth_trajectory([(t + lead, p) for t, p in phonemes], n_frames), speaker, rng, cfg.frame_size
    )
    return wave, frames


def build_synthetic_corpus(root: str | Path, cfg: SyntheticCorpusConfig | None = None) -> Path:
    """Write the embedded corpus to ``root`` in the auto_avsr layout (reused when already built with ``cfg``).

    Train and test sentences are disjoint (the test set holds word combinations never seen in training); every
    speaker appears in both. Labels: ``root/labels/synth_{train,test}.csv``.
    """
    from tqdm.auto import tqdm

    cfg = cfg or SyntheticCorpusConfig()
    root = Path(root)
    stamp = root / "corpus.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == cfg.fingerprint():
        return root
    rng = random.Random(cfg.seed)
    sentences: dict[str, None] = {}
    while len(sentences) < cfg.n_train + cfg.n_test:
        sentences.setdefault(random_sentence(rng), None)
    ordered = list(sentences)
    splits = {"test": ordered[: cfg.n_test], "train": ordered[cfg.n_test :]}
    tts = EspeakNG()
    (root / "labels").mkdir(parents=True, exist_ok=True)
    np_rng = np.random.default_rng(cfg.seed)
    for split, texts in splits.items():
        rows = []
        sub = "test" if split == "test" else "trainval"
        for k, text in enumerate(tqdm(texts, desc=f"synthesising {split}", leave=False)):
            speaker = SPEAKERS[k % len(SPEAKERS)]
            wave, frames = synthesize_utterance(tts, text, speaker, np_rng, cfg)
            rel = Path("synth_video") / sub / speaker.name / f"{k:05d}.mp4"
            out = root / "synth" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            write_video(out, frames)
            write_wav(out.with_suffix(".wav"), wave)
            rows.append(["synth", rel.as_posix(), len(frames), "", text])
        with open(root / "labels" / f"synth_{split}.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)
    stamp.write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": asdict(cfg)}, indent=1))
    return root
