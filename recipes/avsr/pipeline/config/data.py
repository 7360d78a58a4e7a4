"""The data group: where the utterances come from (LRS3 or the embedded corpus) and how the corpus is shaped."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ...data.synthetic import TEXTS, SyntheticCorpusConfig
from .fields import option

CORPUS_SHAPING = ("corpus_text", "corpus_vocab", "held_out_speakers")  # options of the embedded corpus only


@dataclass(frozen=True)
class DataConfig:
    """Data: LRS3 (``--data_dir``) or the embedded corpus, built in ``<output_dir>/corpus``."""

    data_dir: Path | None = option(
        None, "LRS3 root (auto_avsr or raw layout); default: the embedded corpus, built in <output_dir>/corpus"
    )
    layout: str = option("auto", "LRS3 layout", advanced=True, choices=("auto", "auto_avsr", "raw"))
    train_csv: str | None = option(
        None, "auto_avsr labels CSV for training (default: the one named *train*)", advanced=True
    )
    test_csv: str | None = option(
        None, "auto_avsr labels CSV for testing (default: the one named *test*)", advanced=True
    )
    raw_train_subsets: tuple[str, ...] = option(
        ("trainval",), "raw LRS3 folders used for training", advanced=True, nargs="+"
    )
    max_test_utts: int | None = option(None, "decode only the first N test utterances", type=int)
    corpus_train: int = option(1200, "embedded corpus: training utterances", advanced=True)
    corpus_test: int = option(120, "embedded corpus: test utterances", advanced=True)
    corpus_text: str = option(
        "grid",
        "embedded corpus: 'grid', six-word commands over 34 words, or 'open', natural English sentences of 4-12 "
        "words from Debian's fortunes package (thousands of words; needs a pretrained LLM's subword tokenizer)",
        choices=TEXTS,
    )
    corpus_vocab: int | None = option(
        None,
        "embedded corpus, --corpus_text open only: keep the sentences made of the N most frequent words (1200: "
        "1,363 sentences, 3%% of test words unseen in training, against 21%% with every word). Default: every word",
        advanced=True,
        type=int,
        metavar="N",
    )
    held_out_speakers: bool = option(
        False,
        "embedded corpus: the test split is spoken by two voices training never hears (the real preset: on)",
        advanced=True,
    )
    real_speech_test: bool = option(
        False,
        "also decode the 10 recorded utterances of Debian's pocketsphinx-testdata (asr only; the real preset: on)",
        advanced=True,
        action=argparse.BooleanOptionalAction,
    )

    def __post_init__(self):
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        try:  # the corpus's own rules, named as options
            SyntheticCorpusConfig(text=self.corpus_text, vocab_size=self.corpus_vocab)
        except ValueError:
            raise ValueError(
                f"--corpus_vocab {self.corpus_vocab} bounds the words of --corpus_text open: pass --corpus_text open "
                "and a vocabulary of at least 1 word"
            ) from None

    @property
    def embedded(self) -> bool:
        """Whether the run builds and reads the embedded corpus (no ``--data_dir``)."""
        return self.data_dir is None

    def corpus(self, seed: int) -> SyntheticCorpusConfig:
        """The embedded corpus a run of ``seed`` builds."""
        return SyntheticCorpusConfig(
            n_train=self.corpus_train,
            n_test=self.corpus_test,
            seed=seed,
            text=self.corpus_text,
            vocab_size=self.corpus_vocab,
            held_out_speakers=self.held_out_speakers,
        )
