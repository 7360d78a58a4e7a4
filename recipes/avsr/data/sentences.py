"""Open-vocabulary sentences for the embedded corpus: natural English from Debian's ``fortunes`` package.

The GRID-like grammar (:data:`recipes.avsr.data.synthetic.GRAMMAR`) has 34 words in 6 slots: a model can learn it
whole and a real LLM's prior plays no part. ``fortunes`` (BSD; quotations, proverbs, poems, jokes) gives thousands of
short English sentences over a vocabulary of thousands of words, offline:

    apt-get install -y fortunes     # scripts/setup.sh does this

:func:`fortune_sentences` splits its entries into sentences and keeps those of 4 to 12 words made of letters,
apostrophes and ordinary punctuation, normalised the way WER is scored (lower case, no punctuation).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .lrs3 import normalize_text

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# the files read, in this order (others are mostly ASCII art, computer jokes, politics or offensive)
FORTUNE_FILES = (
    "wisdom",
    "platitudes",
    "people",
    "education",
    "science",
    "work",
    "art",
    "food",
    "kids",
    "love",
    "pets",
    "sports",
    "medicine",
    "law",
    "humorists",
    "miscellaneous",
    "cookie",
    "songs-poems",
)
MIN_WORDS, MAX_WORDS = 4, 12  # 12 words are about 5 s of espeak-ng speech: inside an 8 s --audio_window
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PLAIN = re.compile(r"[A-Za-z ,;:'\-]+[.!?]?")  # no digits, brackets or symbols: every word is speakable as written


def _entry_text(entry: str) -> str:
    """One fortune without its attribution lines (``-- Author``, or indented by tabs) as a single line."""
    kept = [line.strip() for line in entry.splitlines() if not line.strip().startswith("--")]
    kept = [line for line in kept if line]
    return " ".join(kept)


def fortune_sentences(
    root: str | Path = FORTUNES_DIR, files: Iterable[str] = FORTUNE_FILES, exclude: Iterable[str] = ()
) -> list[str]:
    """Distinct normalised sentences of 4 to 12 words from the ``fortunes`` files, in file order.

    ``exclude``: transcripts that must not occur (e.g. the recorded-speech test set's), compared after normalising.

    Raises:
        FileNotFoundError: the package is not installed (names the apt command), or a listed file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found: the open-vocabulary corpus reads Debian's fortunes package; install it with "
            "`apt-get install -y fortunes` (scripts/setup.sh does), or use --corpus_text grid"
        )
    banned = {normalize_text(t) for t in exclude}
    sentences: dict[str, None] = {}
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall fortunes (`apt-get install --reinstall fortunes`)")
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            for sentence in _SENTENCE_END.split(_entry_text(entry)):
                sentence = sentence.strip().strip('"').strip()
                if not _PLAIN.fullmatch(sentence):
                    continue
                words = normalize_text(sentence.replace("-", " ")).replace(" '", " ").replace("' ", " ").split()
                words = [w.strip("'") for w in words if w.strip("'")]
                text = " ".join(words)
                if MIN_WORDS <= len(words) <= MAX_WORDS and text not in banned:
                    sentences.setdefault(text, None)
    return list(sentences)


def within_vocabulary(sentences: list[str], vocab_size: int) -> list[str]:
    """The sentences made only of the ``vocab_size`` most frequent words of ``sentences`` (ties: first seen first).

    A bounded vocabulary keeps natural sentences but lets training hear most test words: on the fortunes pool,
    1,200 words leave 1,363 sentences, and the seed-0 1,200 / 120 split of them has 3 % of test words unseen in
    training, against 21 % with every word.
    """
    if vocab_size < 1:
        raise ValueError(f"the vocabulary size must be >= 1 word, got {vocab_size}")
    counts = Counter(word for sentence in sentences for word in sentence.split())
    kept = {word for word, _ in counts.most_common(vocab_size)}
    return [s for s in sentences if all(word in kept for word in s.split())]


def vocabulary_stats(train: list[str], test: list[str]) -> dict[str, float | int]:
    """Word types of each split and the share of test words (tokens) never seen in training (the OOV rate)."""
    seen = {word for sentence in train for word in sentence.split()}
    test_words = [word for sentence in test for word in sentence.split()]
    return {
        "train_word_types": len(seen),
        "test_word_types": len(set(test_words)),
        "test_oov_rate": sum(word not in seen for word in test_words) / max(1, len(test_words)),
    }
