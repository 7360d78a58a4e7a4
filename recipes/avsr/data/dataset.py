"""The dataset of the AVSR recipe: decodes an utterance's streams, crops and normalises its frames.

A file that cannot be read raises :class:`~recipes.avsr.data.media.AVSRDataError` naming it; the dataset reports
such an utterance, skips it and counts it, so one bad file never silently kills a long run.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from .augment import AUDIO_MASK, VIDEO_MASK, Augmentation, BabbleBank, make_noise, mix_at_snr, time_mask
from .lrs3 import Utterance
from .media import AUDIO_RATE, SAMPLES_PER_FRAME, AVSRDataError, cut_or_pad, load_audio, load_video

logger = logging.getLogger(__name__)

LRS3_MEAN, LRS3_STD = 0.421, 0.165  # auto_avsr's grayscale normalisation of mouth crops


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


@dataclass(frozen=True)
class Skipped:
    """What the dataset returns for an unreadable utterance: its uid and why. The collator puts it into the batch
    (``batch["skipped"]``), so the count survives DataLoader worker processes."""

    uid: str
    reason: str


_DECODED: dict[tuple[str, str], np.ndarray] = {}  # (loader, path) -> decoded stream, filled by preloading datasets


class AVSRDataset(Dataset):
    """Decodes an utterance's streams on access; an unreadable utterance yields a :class:`Skipped` and is counted.

    Args:
        utterances: manifest rows.
        modality: ``"asr"``, ``"vsr"`` or ``"avsr"``: which streams are decoded.
        video_transform: crop/normalisation of the frames.
        train: whether augmentation (random crop) applies.
        max_audio_seconds: longer audio is skipped and counted, not cut (a Whisper encoder sees at most 30 s; its
            feature extractor would silently drop the rest while the video and transcript stay whole).
        snr_db: add white noise at this signal-to-noise ratio to the audio (a noisy test set, Llama-AVSR's
            ``--decode-snr-target``); the noise of an utterance is fixed by its uid, so every decode hears the same.
        noise_type: ``"white"`` or ``"babble"`` (the sum of several utterances of ``babble``) for ``snr_db``.
        babble: the bank babble noise is drawn from (training utterances), for ``noise_type="babble"`` and for
            ``augment.snr_range``.
        augment: training augmentation (babble at a random SNR, time masking), drawn per utterance and epoch
            (:meth:`set_epoch`); only when ``train``.
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
        max_audio_seconds: float | None = None,
        snr_db: float | None = None,
        noise_type: str = "white",
        babble: BabbleBank | None = None,
        augment: Augmentation | None = None,
    ):
        if modality not in ("asr", "vsr", "avsr"):
            raise ValueError(f"modality must be 'asr', 'vsr' or 'avsr', got {modality!r}")
        self.utterances = list(utterances)
        self.modality = modality
        self.video_transform = video_transform or VideoTransform()
        self.train = train
        self.max_audio_seconds = max_audio_seconds
        self.snr_db = snr_db
        self.noise_type, self.babble = noise_type, babble
        self.augment = augment if train and augment is not None and augment.active else None
        wants_babble = (snr_db is not None and noise_type == "babble") or (self.augment and self.augment.snr_range)
        if wants_babble and modality != "vsr" and babble is None:
            raise ValueError("babble noise needs a bank of training utterances: pass babble=BabbleBank(...)")
        self.epoch = 0
        self.swap: tuple[str, list[int]] | None = None  # (stream, donor index per item): see __getitem__
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
                seconds = len(wave) / AUDIO_RATE
                if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
                    raise AVSRDataError(
                        f"audio {u.audio} lasts {seconds:.1f} s, longer than the audio encoder's "
                        f"{self.max_audio_seconds:g} s input (it would be cut while video and transcript stay "
                        "whole); segment long utterances first (auto_avsr's preprocessing cuts LRS3 pretrain "
                        "utterances at word boundaries)"
                    )
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

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation draws for (the training loop sets it before each epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | Skipped:
        """The item; with ``swap = (stream, donors)`` its ``stream`` ("audio" or "video") is item ``donors[index]``'s,
        and ``item[stream + "_uid"]`` names whose (encoder features are cached under it)."""
        item = self._item(index)
        if self.swap is None or isinstance(item, Skipped):
            return item
        stream, donors = self.swap
        donor = self._item(donors[index])
        if isinstance(donor, Skipped):
            return Skipped(item["uid"], f"its {stream} donor {donor.uid} is unreadable: {donor.reason}")
        return {**item, stream: donor[stream], f"{stream}_uid": donor["uid"]}

    def _item(self, index: int) -> dict | Skipped:
        raw = self._cache[index] if self._cache is not None else self._decode(index)
        if raw is None:
            uid = self.utterances[index].uid
            return Skipped(uid, self.bad[uid])
        item = {k: v for k, v in raw.items() if k != "frames"}
        rng = self.augment.rng(self.epoch, raw["uid"]) if self.augment is not None else None
        if "frames" in raw:
            frames = raw["frames"]
            if rng is not None and self.augment.time_mask:
                frames = time_mask(frames, *VIDEO_MASK, rng)  # black frames, as before normalisation
            try:
                item["video"] = self.video_transform(frames, train=self.train)
            except AVSRDataError as err:
                self.bad[raw["uid"]] = str(err)
                logger.warning("skipping %s: %s", raw["uid"], err)
                return Skipped(raw["uid"], str(err))
        if "audio" in item:
            item["audio"] = self._noisy(item["audio"], item["uid"], rng)
        return item

    def _noisy(self, wave: np.ndarray, uid: str, rng: np.random.Generator | None) -> np.ndarray:
        if self.snr_db is not None and self.noise_type == "white":
            return add_noise(wave, self.snr_db, seed=zlib.crc32(uid.encode()))
        if self.snr_db is not None:
            noise = make_noise(
                self.noise_type, len(wave), np.random.default_rng(zlib.crc32(uid.encode())), self.babble, uid
            )
            return mix_at_snr(wave, noise, self.snr_db)
        if rng is None:
            return wave
        if self.augment.snr_range is not None:
            low, high = self.augment.snr_range
            wave = mix_at_snr(wave, self.babble.noise(len(wave), rng, exclude=uid), float(rng.uniform(low, high)))
        if self.augment.time_mask:
            wave = time_mask(wave, *AUDIO_MASK, rng)
        return wave


def add_noise(wave: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """``wave`` plus white Gaussian noise at ``snr_db`` dB below its mean power (the same noise for the same seed)."""
    power = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-12
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), size=wave.shape)
    return (wave + noise).astype(np.float32)
