"""Audio noise and time masking, as Llama-AVSR augments and tests (all off by default).

* :func:`mix_at_snr`: noise scaled so that the mixture has exactly the asked signal-to-noise ratio.
* :class:`BabbleBank`: babble noise, a sum of several other utterances of the training split.
* :func:`time_mask`: zeroes random spans in time (Llama-AVSR's adaptive time mask: one span of up to ``window``
  steps per ``stride`` steps), for waveforms and for frame sequences.
* :class:`Augmentation`: what the training dataset applies, drawn afresh for every utterance and epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Llama-AVSR's training transforms: a span of up to 0.4 s per second of audio, up to 10 frames per 25 of video
AUDIO_MASK = (6400, 16000)  # (window, stride) in samples at 16 kHz
VIDEO_MASK = (10, 25)  # (window, stride) in frames at 25 fps
NOISE_TYPES = ("white", "babble")


def snr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    """``10 log10(P_signal / P_noise)`` of a signal and the noise added to it."""
    power = np.mean(signal.astype(np.float64) ** 2)
    return float(10 * np.log10(power / np.mean(noise.astype(np.float64) ** 2)))


def mix_at_snr(wave: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """``wave`` plus ``noise`` (same length) scaled to ``snr`` dB below the mean power of ``wave``."""
    if noise.shape != wave.shape:
        raise ValueError(f"noise of shape {noise.shape} does not match the audio's {wave.shape}")
    p_wave = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-12
    p_noise = float(np.mean(noise.astype(np.float64) ** 2))
    if p_noise == 0:
        raise ValueError("the noise is silent: it cannot be scaled to an SNR")
    scale = math.sqrt(p_wave / (p_noise * 10 ** (snr / 10)))
    return (wave.astype(np.float64) + scale * noise).astype(np.float32)


class BabbleBank:
    """Babble: the sum of ``talkers`` utterances of a bank (the training split's), each from a random offset and
    looped to the needed length; the utterance being noised (its uid) is never one of its own talkers."""

    def __init__(self, waves: dict[str, np.ndarray], talkers: int = 4):
        waves = {uid: w for uid, w in waves.items() if len(w) and np.any(w)}
        if len(waves) < talkers + 1:
            raise ValueError(
                f"babble noise of {talkers} talkers needs at least {talkers + 1} non-silent training utterances, "
                f"got {len(waves)}"
            )
        self.waves, self.talkers = waves, talkers

    @classmethod
    def from_utterances(
        cls, utterances: Sequence, load: Callable[[str], np.ndarray], size: int = 32, talkers: int = 4
    ) -> BabbleBank:
        """A bank of the first ``size`` utterances with readable audio (``load`` decodes a path)."""
        from .media import AVSRDataError

        waves = {}
        for u in utterances:
            if len(waves) == size:
                break
            try:
                waves[u.uid] = load(u.audio) if u.audio else None
            except AVSRDataError:
                continue
        return cls({uid: w for uid, w in waves.items() if w is not None}, talkers)

    def noise(self, n_samples: int, rng: np.random.Generator, exclude: str | None = None) -> np.ndarray:
        """``n_samples`` of babble (float64), drawn with ``rng``."""
        uids = [uid for uid in self.waves if uid != exclude]
        out = np.zeros(n_samples)
        for k in rng.choice(len(uids), size=self.talkers, replace=False):
            wave = self.waves[uids[k]].astype(np.float64)
            start = int(rng.integers(len(wave)))
            out += np.resize(np.roll(wave, -start), n_samples)  # np.resize repeats the wave as needed
        return out


def make_noise(kind: str, n_samples: int, rng: np.random.Generator, bank: BabbleBank | None, uid: str) -> np.ndarray:
    """White Gaussian noise or babble of ``n_samples`` (``bank`` is needed for babble)."""
    if kind == "white":
        return rng.normal(0.0, 1.0, size=n_samples)
    if kind == "babble":
        if bank is None:
            raise ValueError("babble noise needs a BabbleBank of training utterances (make_loader's babble_from)")
        return bank.noise(n_samples, rng, exclude=uid)
    raise ValueError(f"noise type must be one of {NOISE_TYPES}, got {kind!r}")


def time_mask(x: np.ndarray, window: int, stride: int, rng: np.random.Generator, value: float = 0) -> np.ndarray:
    """A copy of ``x`` (time first) with ``ceil(T / stride)`` spans of ``0..window-1`` steps set to ``value``."""
    out = x.copy()
    length = x.shape[0]
    for _ in range(math.ceil(length / stride)):
        width = int(rng.integers(window))
        if width == 0 or width >= length:
            continue
        start = int(rng.integers(length - width + 1))
        out[start : start + width] = value
    return out


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of the dataset (Llama-AVSR style).

    Args:
        snr_range: babble noise at an SNR drawn uniformly from ``(low, high)`` dB per utterance and epoch (None:
            clean audio).
        time_mask: zero random time spans of the audio and the mouth frames (:data:`AUDIO_MASK`,
            :data:`VIDEO_MASK`).
        seed: with the epoch and the uid, fixes every draw (a resumed run sees the same augmentation).
    """

    snr_range: tuple[float, float] | None = None
    time_mask: bool = False
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.snr_range is not None or self.time_mask

    def rng(self, epoch: int, uid: str) -> np.random.Generator:
        import zlib

        return np.random.default_rng([self.seed, epoch, zlib.crc32(uid.encode())])
