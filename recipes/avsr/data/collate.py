"""Batches of the AVSR recipe: padding, log-mel features, transcript token ids and the stream-rate arithmetic.

Rates: audio is sampled at 16 kHz and video at 25 fps (640 samples per frame); a Whisper encoder gives 50 frames per
second (hop 160, then its stride-2 convolution). A projector then keeps one LLM token per ``rate`` encoder frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .media import AUDIO_RATE, VIDEO_FPS

WHISPER_STRIDE = 2  # mel hops per Whisper encoder frame (its stride-2 convolution)
AUDIO_FRAME_RATE = 50  # Hz: Whisper encoder frames at 16 kHz with hop 160


def audio_frames(n_samples: int, hop_length: int) -> int:
    """Whisper encoder frames covering ``n_samples`` (before the encoder's fixed-length padding)."""
    return math.ceil(n_samples / hop_length / WHISPER_STRIDE)


def matching_video_rate(audio_rate: int) -> int:
    """The video rate giving (at most) as many tokens per second as ``audio_rate`` gives audio tokens, at least 1."""
    return max(1, audio_rate * VIDEO_FPS // AUDIO_FRAME_RATE)


def tokenize_transcripts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each transcript as it follows the prompt (a leading space, no special tokens)."""
    return [tokenizer(" " + t if t else t, add_special_tokens=False).input_ids for t in texts]


@dataclass
class AVSRCollator:
    """Pads a list of dataset items into a batch; unreadable items (``Skipped`` or None) are dropped and counted,
    and ``batch["skipped"]`` maps their uids to the reasons (it reaches the training process from any worker).

    Audio becomes log-mel features through ``feature_extractor`` (a transformers ``WhisperFeatureExtractor``: the
    encoder needs its fixed input length) plus the number of valid 50 Hz encoder frames; video is padded in time.
    With a ``tokenizer`` (the LLM's), the batch also carries ``transcript_ids`` (:func:`tokenize_transcripts`), which
    training needs.
    """

    feature_extractor: object | None = None
    tokenizer: object | None = None
    skipped: int = field(default=0, init=False)

    def __call__(self, items: list) -> dict:
        good = [it for it in items if isinstance(it, dict)]
        self.skipped += len(items) - len(good)
        batch: dict = {
            "uids": [it["uid"] for it in good],
            "texts": [it["text"] for it in good],
            "skipped": {it.uid: it.reason for it in items if hasattr(it, "reason")},  # dataset.Skipped
        }
        if not good:
            return batch
        for stream in ("audio", "video"):  # a swap control's batch: whose stream each row carries
            if f"{stream}_uid" in good[0]:
                batch[f"{stream}_uids"] = [it[f"{stream}_uid"] for it in good]
        if self.tokenizer is not None:
            batch["transcript_ids"] = tokenize_transcripts(self.tokenizer, batch["texts"])
        if "audio" in good[0]:
            if self.feature_extractor is None:
                raise ValueError("the batch has audio but the collator has no feature_extractor")
            waves = [it["audio"] for it in good]
            feats = self.feature_extractor(waves, sampling_rate=AUDIO_RATE, return_tensors="pt", padding="max_length")
            batch["audio_features"] = feats.input_features  # B, n_mels, fixed length
            hop = self.feature_extractor.hop_length
            max_frames = feats.input_features.shape[-1] // WHISPER_STRIDE
            batch["audio_lengths"] = torch.tensor([min(audio_frames(len(w), hop), max_frames) for w in waves])
        if "video" in good[0]:
            lengths = [it["video"].shape[0] for it in good]
            t_max, (h, w) = max(lengths), good[0]["video"].shape[1:]
            video = torch.zeros(len(good), t_max, h, w)
            for b, it in enumerate(good):
                video[b, : lengths[b]] = torch.from_numpy(it["video"])
            batch["video"] = video  # B, T, H, W
            batch["video_lengths"] = torch.tensor(lengths)
        return batch
