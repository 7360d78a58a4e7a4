"""Data loaders of the AVSR recipe: length-bucketed batches under a frame budget over an :class:`AVSRDataset`."""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from ..pipeline.config.fields import option
from .augment import NOISE_TYPES, Augmentation, BabbleBank
from .collate import AVSRCollator
from .dataset import AVSRDataset, VideoTransform
from .lrs3 import Utterance, check_files
from .media import AVSRDataError, load_audio


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


def _snr_range(values) -> tuple[float, float] | None:
    """``--train_snr_range``: ``LOW HIGH`` (dB) or ``off``."""
    if values is None or list(values) == ["off"]:
        return None
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        raise ValueError(f"--train_snr_range takes LOW HIGH (dB) or 'off', got {' '.join(map(str, values))}") from None
    return low, high


@dataclass(frozen=True)
class LoaderConfig:
    """How a run reads its utterances (resolved from the command line once, see ``recipes.avsr.pipeline.config``).

    Args:
        crop_size: centre crop of the mouth frames (a random crop for training sets when ``random_crop``).
        mouth_box: ``(top, left, height, width)`` cut from raw LRS3 face videos before cropping.
        random_crop: random crop of the training frames.
        preload: decode every file once into memory.
        max_frames: frame budget of a training batch (video frames at 25 fps, padded length times batch size);
            None: :data:`REFERENCE_FRAME_BUDGET` when ``reference_budget``, else the longest utterance times
            ``max_batch_size``.
        reference_budget: Llama-AVSR's budget when ``max_frames`` is None (1,000 frames for asr and avsr, 1,500
            for vsr).
        max_batch_size: utterances per training batch at most.
        eval_batch_size: utterances per test batch at most.
        num_workers: DataLoader worker processes.
        test_snr_db: white noise at this SNR (dB) added to the test audio (None: clean).
        test_noise: ``"white"`` or ``"babble"`` (several training utterances summed) for ``test_snr_db``.
        train_snr_range: babble noise at a random SNR in this range (dB) on the training audio, drawn per
            utterance and epoch (None: off).
        time_mask: Llama-AVSR's time masking of the training audio and video (off by default).
    """

    crop_size: int | None = option(
        88, "centre crop of the mouth frames (88 for LRS3; the embedded preset: 44)", type=int
    )
    mouth_box: tuple[int, int, int, int] | None = option(
        None,
        "fixed mouth region cut from raw LRS3 face videos before cropping",
        advanced=True,
        type=int,
        nargs=4,
        metavar=("TOP", "LEFT", "H", "W"),
    )
    random_crop: bool | None = option(
        None,
        "random crop of the training frames (default: on for LRS3, off for the embedded corpus)",
        advanced=True,
        action=argparse.BooleanOptionalAction,
    )
    preload: bool = option(
        False, "decode every file once into memory (the embedded preset: on)", advanced=True,
        action=argparse.BooleanOptionalAction,
    )  # fmt: skip
    max_frames: int | None = option(
        None,
        "frame budget of a training batch (video frames at 25 fps; default: Llama-AVSR's 1000 for asr/avsr, 1500 "
        "for vsr on LRS3; none for the embedded corpus)",
        type=int,
    )
    reference_budget: bool = False  # resolved from the data source (LRS3: on), not an option
    max_batch_size: int = option(16, "utterances per training batch at most")
    eval_batch_size: int = option(16, "utterances per test batch at most", advanced=True)
    num_workers: int = option(0, "DataLoader worker processes", advanced=True)
    test_snr_db: float | None = option(
        None, "noise at this SNR (dB) on the test audio", flag="--decode_snr_target", type=float
    )
    test_noise: str = option(
        "white",
        "the noise of --decode_snr_target and --test_snrs: white, or babble (4 training utterances summed); the real "
        "preset: babble when the test set is decoded with noise",
        flag="--decode_noise",
        choices=NOISE_TYPES,
    )
    train_snr_range: tuple[float, float] | None = option(
        None,
        "babble noise on the training audio at an SNR (dB) drawn per utterance and epoch (Llama-AVSR: -5 20; the "
        "real preset: -5 20; 'off' turns it off)",
        nargs="+",
        metavar="LOW HIGH | off",
        type=str,
    )
    time_mask: bool = option(
        False,
        "Llama-AVSR's time masking in training: up to 0.4 s of audio per second, up to 10 of every 25 frames",
        advanced=True,
    )

    def __post_init__(self):
        snr_range = _snr_range(self.train_snr_range)
        object.__setattr__(self, "train_snr_range", snr_range)
        if self.mouth_box is not None:
            object.__setattr__(self, "mouth_box", tuple(self.mouth_box))
        if snr_range and not all(math.isfinite(v) for v in snr_range):
            raise ValueError("SNRs must be finite numbers of dB (--test_snrs, --train_snr_range)")
        if snr_range and snr_range[0] > snr_range[1]:
            raise ValueError(f"--train_snr_range LOW HIGH needs LOW <= HIGH, got {snr_range}")

    @property
    def augmenting(self) -> bool:
        """Whether training inputs change every epoch (noise or masking): encoder outputs cannot be cached."""
        return bool(self.train_snr_range) or self.time_mask

    def frame_budget(self, modality: str) -> int | None:
        """The frame budget of a training batch for ``modality`` (None: no budget but ``max_batch_size``)."""
        if self.max_frames is not None:
            return self.max_frames
        return REFERENCE_FRAME_BUDGET[modality] if self.reference_budget else None


# Llama-AVSR's batches (its train.py defaults --max-frames-audio/-video/-audiovisual): 1,000 / 1,500 / 1,000 frames
REFERENCE_FRAME_BUDGET = {"asr": 1000, "vsr": 1500, "avsr": 1000}


def make_loader(
    config: LoaderConfig,
    utterances: list[Utterance],
    modality: str,
    feature_extractor=None,
    tokenizer=None,
    train: bool = False,
    seed: int = 0,
    babble_from: list[Utterance] | None = None,
) -> DataLoader:
    """A DataLoader over ``utterances`` with length-bucketed batches (``loader.dataset`` counts the skipped files).

    Utterances whose files are missing are dropped with a warning and counted in ``loader.dataset.bad``; when none
    is left, an :class:`AVSRDataError` names the missing files. Audio longer than the feature extractor's window
    (30 s for Whisper) is skipped and counted, never cut. ``babble_from`` (the training split) is where babble
    noise comes from, when the configuration asks for it.
    """
    n_given = len(utterances)
    utterances, problems = check_files(utterances, modality)
    for msg in problems:
        print(f"warning: skipping {msg}", file=sys.stderr)
    if not utterances:
        raise AVSRDataError(
            f"none of the {n_given} {'training' if train else 'test'} utterances has its files "
            f"({len(problems)} missing), e.g. {problems[:3]}; check --data_dir and the labels CSV"
        )
    transform = VideoTransform(
        crop_size=config.crop_size, mouth_box=config.mouth_box, random_crop=train and config.random_crop
    )
    window = None
    if feature_extractor is not None and modality in ("asr", "avsr"):
        window = feature_extractor.n_samples / feature_extractor.sampling_rate
    augment = Augmentation(config.train_snr_range, config.time_mask, seed) if train else None
    needs_babble = (augment is not None and augment.snr_range is not None) or (
        not train and config.test_snr_db is not None and config.test_noise == "babble"
    )
    babble = None
    if needs_babble and modality != "vsr":
        if not babble_from:
            raise ValueError("babble noise needs the training utterances: pass make_loader(..., babble_from=...)")
        babble = BabbleBank.from_utterances(check_files(babble_from, "asr")[0], load_audio)
    dataset = AVSRDataset(
        utterances,
        modality,
        transform,
        train=train,
        preload=config.preload,
        max_audio_seconds=window,
        snr_db=None if train else config.test_snr_db,
        noise_type=config.test_noise,
        babble=babble,
        augment=augment,
    )
    dataset.bad.update({m.split(":")[0]: m for m in problems})
    lengths = dataset.lengths
    budget = config.frame_budget(modality) if train else config.max_frames
    max_frames = budget or max(lengths) * config.max_batch_size
    sampler = LengthBucketSampler(
        lengths,
        max(max_frames, max(lengths)),
        config.max_batch_size if train else config.eval_batch_size,
        shuffle=train,
        seed=seed,
    )
    collator = AVSRCollator(feature_extractor, tokenizer)
    # a private generator: starting an epoch must not draw from the global RNG (dropout), or a resumed run drifts
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=config.num_workers, generator=generator
    )
