"""The open-vocabulary corpus: sentences from Debian's fortunes package, and held-out test voices."""

import json
import re
from collections import Counter

import pytest

from recipes.avsr.data import sentences
from recipes.avsr.data.lrs3 import find_split_csv, scan_auto_avsr
from recipes.avsr.data.synthetic import HELD_OUT_SPEAKERS, SPEAKERS, SyntheticCorpusConfig, build_synthetic_corpus

needs_fortunes = pytest.mark.skipif(
    not sentences.FORTUNES_DIR.is_dir(), reason="needs `apt-get install -y fortunes` (scripts/setup.sh)"
)


def test_entries_become_plain_sentences_without_attributions_digits_or_symbols(tmp_path):
    (tmp_path / "wisdom").write_text(
        "A penny saved is a penny earned. Waste not, want not!\n"
        "\t\t-- Benjamin Franklin\n%\n"
        "Call 555 1234 for a good time today.\n%\n"
        "It's a well-known fact that cats <3 boxes. The early bird gets the worm.\n%\n"
        "Too short.\n"
    )
    got = sentences.fortune_sentences(tmp_path, files=["wisdom"])
    assert got == ["a penny saved is a penny earned", "waste not want not", "the early bird gets the worm"]
    assert sentences.fortune_sentences(tmp_path, files=["wisdom"], exclude=["Waste not, want NOT."]) == [
        "a penny saved is a penny earned",
        "the early bird gets the worm",
    ]


def test_a_missing_package_or_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        sentences.fortune_sentences(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="reinstall fortunes"):
        sentences.fortune_sentences(tmp_path, files=["wisdom"])


@needs_fortunes
def test_the_installed_package_gives_thousands_of_distinct_speakable_sentences():
    pool = sentences.fortune_sentences()
    assert len(pool) > 5000 and len(set(pool)) == len(pool)
    assert all(re.fullmatch(r"[a-z']+( [a-z']+){3,11}", s) for s in pool)
    vocabulary = {w for s in pool for w in s.split()}
    assert len(vocabulary) > 5000  # an open word list, against the grammar's 34 words


@needs_fortunes
def test_the_open_corpus_has_held_out_voices_and_disjoint_sentences(tmp_path):
    cfg = SyntheticCorpusConfig(n_train=6, n_test=4, seed=3, text="open", held_out_speakers=True)
    root = build_synthetic_corpus(tmp_path / "corpus", cfg)
    train = scan_auto_avsr(root, find_split_csv(root, "train"))
    test = scan_auto_avsr(root, find_split_csv(root, "test"))
    pool = set(sentences.fortune_sentences())
    assert {u.text for u in train + test} <= pool
    assert not {u.text for u in train} & {u.text for u in test}
    assert {u.speaker for u in test} == {s.name for s in HELD_OUT_SPEAKERS}
    assert {u.speaker for u in train} <= {s.name for s in SPEAKERS}
    mixed = build_synthetic_corpus(tmp_path / "mixed", SyntheticCorpusConfig(n_train=6, n_test=4, seed=3, text="open"))
    assert {u.speaker for u in scan_auto_avsr(mixed, find_split_csv(mixed, "test"))} <= {s.name for s in SPEAKERS}
    assert cfg.fingerprint(sorted(pool)) != cfg.fingerprint(sorted(pool)[1:])  # the pool is part of the corpus


def test_an_unknown_text_source_is_refused():
    with pytest.raises(ValueError, match="one of \\('grid', 'open'\\)"):
        SyntheticCorpusConfig(text="wiki")


def test_a_bounded_vocabulary_keeps_the_sentences_of_the_most_frequent_words():
    pool = ["the cat sat", "the dog sat", "a cat ran", "the cat ran far"]  # the 3, cat 3, sat 2, ran 2, ...
    assert sentences.within_vocabulary(pool, 4) == ["the cat sat"]
    assert sentences.within_vocabulary(pool, 5) == ["the cat sat", "the dog sat"]  # dog: first of the ties
    assert sentences.within_vocabulary(pool, 100) == pool
    with pytest.raises(ValueError, match=">= 1 word"):
        sentences.within_vocabulary(pool, 0)


def test_vocabulary_stats_count_the_test_words_training_never_heard():
    stats = sentences.vocabulary_stats(["the cat sat", "a dog"], ["the cat ran", "a bird"])
    assert stats == {"train_word_types": 5, "test_word_types": 5, "test_oov_rate": 2 / 5}


@needs_fortunes
def test_a_bounded_open_corpus_draws_only_sentences_of_common_words(tmp_path):
    cfg = SyntheticCorpusConfig(n_train=6, n_test=4, seed=3, text="open", vocab_size=300)
    root = build_synthetic_corpus(tmp_path / "corpus", cfg)
    texts = [u.text for split in ("train", "test") for u in scan_auto_avsr(root, find_split_csv(root, split))]
    pool = sentences.fortune_sentences()
    common = {w for w, _ in Counter(w for s in pool for w in s.split()).most_common(300)}
    assert len(texts) == 10 and all(set(t.split()) <= common for t in texts)
    words = json.loads((root / "corpus.json").read_text())["words"]
    test = [u.text for u in scan_auto_avsr(root, find_split_csv(root, "test"))]
    train = [u.text for u in scan_auto_avsr(root, find_split_csv(root, "train"))]
    assert words == sentences.vocabulary_stats(train, test)
    unbounded = SyntheticCorpusConfig(n_train=6, n_test=4, seed=3, text="open")
    assert cfg.fingerprint() != unbounded.fingerprint()
    with pytest.raises(ValueError, match="within --corpus_vocab 2 words, fewer than .* larger --corpus_vocab"):
        build_synthetic_corpus(
            tmp_path / "tiny", SyntheticCorpusConfig(n_train=6, n_test=4, text="open", vocab_size=2)
        )


def test_a_vocabulary_bound_is_refused_for_the_grammar():
    with pytest.raises(ValueError, match="needs text='open'"):
        SyntheticCorpusConfig(vocab_size=100)
