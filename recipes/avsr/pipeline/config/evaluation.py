"""The evaluation group: decoding, and the test sets and controls every run is scored on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .fields import option


@dataclass(frozen=True)
class EvalConfig:
    """Decoding and scoring: beam search, the untrained and noisy test sets, the stream-swap controls."""

    num_beams: int = option(15, "beam width (15 as Llama-AVSR; the real preset: 1, greedy)")
    max_new_tokens: int = option(32, "longest transcript decoded, in tokens", advanced=True)
    eval_untrained: bool = option(
        True, "also decode with the untrained model (the WER that training must beat)", advanced=True
    )
    test_snrs: tuple[float, ...] = option(
        (),
        "after the clean test set, decode it again with --decode_noise at each of these SNRs (dB): the WER against "
        "SNR (results.json 'test_by_snr'); the real preset: 10 5 0 -5 (an empty list turns it off)",
        type=float,
        nargs="*",
        metavar="DB",
    )
    swap_controls: bool = option(
        False,
        "also decode with the video (wer_swap_video) and/or audio (wer_swap_audio) of every test utterance replaced "
        "by another's (a fixed derangement): shows whether each stream is used",
    )
    swap_seed: int = option(0, "seed of the swap controls' derangement", advanced=True)

    def __post_init__(self):
        object.__setattr__(self, "test_snrs", tuple(float(v) for v in self.test_snrs))
        if not all(math.isfinite(v) for v in self.test_snrs):
            raise ValueError("SNRs must be finite numbers of dB (--test_snrs, --train_snr_range)")
