"""Controls that say what a WER means: the chance level of a test set and stream-swap derangements.

* :func:`chance_baseline`: the WER of constant outputs fitted on the training split only (its most frequent word,
  and its position-wise most frequent words at its most common transcript length): what a model that ignores
  audio and video can reach.
* :func:`derangement`: a fixed, seeded permutation without fixed points; decoding with one stream of every test
  utterance replaced by another utterance's (``--swap_controls``) shows whether the model uses that stream.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from ..data.lrs3 import normalize_text

SWAPS = {"asr": ("audio",), "vsr": ("video",), "avsr": ("video", "audio")}  # the streams swapped per modality


def _wer(refs: list[str], hyp: str) -> float:
    import jiwer

    return round(100 * jiwer.wer(refs, [hyp] * len(refs)), 2)


def chance_baseline(train_texts: Sequence[str], test_texts: Sequence[str]) -> dict:
    """WER on ``test_texts`` of two constant transcripts chosen from ``train_texts`` alone.

    ``most_frequent_word``: the training split's most frequent word, output for every utterance.
    ``mode_transcript``: at the most common training transcript length, the most frequent word at each position
    (for a fixed grammar, the best constant transcript one can pick without seeing the test set).
    ``wer`` is the lower of the two: the chance level the trained WERs are compared with.
    """
    train = [normalize_text(t).split() for t in train_texts]
    refs = [normalize_text(t) for t in test_texts]
    train = [words for words in train if words]
    if not train or not refs:
        raise ValueError(f"the chance baseline needs transcripts: {len(train)} training, {len(refs)} test")
    word = Counter(w for words in train for w in words).most_common(1)[0][0]
    length = Counter(len(words) for words in train).most_common(1)[0][0]
    same_length = [words for words in train if len(words) == length]
    mode = " ".join(Counter(words[i] for words in same_length).most_common(1)[0][0] for i in range(length))
    result = {
        "most_frequent_word": word,
        "wer_most_frequent_word": _wer(refs, word),
        "mode_transcript": mode,
        "wer_mode_transcript": _wer(refs, mode),
    }
    result["wer"] = min(result["wer_most_frequent_word"], result["wer_mode_transcript"])
    return result


def derangement(n: int, seed: int = 0) -> list[int]:
    """``donor[i] != i`` for every ``i`` (a single cycle through a seeded shuffle); ``n >= 2``."""
    if n < 2:
        raise ValueError(f"swapping streams between utterances needs at least 2 test utterances, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    donor = [0] * n
    for k, i in enumerate(order):
        donor[i] = order[(k + 1) % n]
    return donor
