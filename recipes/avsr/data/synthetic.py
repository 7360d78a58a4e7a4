"""The embedded corpus of the AVSR recipe: espeak-ng speech and a phoneme-timed mouth video, in the auto_avsr layout.

The corpus (:func:`build_synthetic_corpus`) is GRID-like by default: six-word commands from a 34-word vocabulary,
spoken by espeak-ng voices (real synthesized speech) with a grayscale mouth-region video whose lip shapes follow the
phoneme timings espeak-ng reports, so both the audio and the lips carry the words. ``text="open"`` speaks natural
English sentences instead (:mod:`recipes.avsr.data.sentences`), and ``held_out_speakers`` gives the test split voices
that training never hears. It is written in the auto_avsr layout and read back through the same loader as LRS3.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .espeak import EspeakNG
from .media import AUDIO_RATE, SAMPLES_PER_FRAME, VIDEO_FPS, cut_or_pad, write_video, write_wav
from .sentences import vocabulary_stats

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
# test-only talkers of ``held_out_speakers``: accents (Lancaster, New York City) no training voice has
HELD_OUT_SPEAKERS: list[Speaker] = [
    Speaker("s07", "en-gb-x-gbclan+m2", 162, 45, 0.64, 0.39, 1.02, 3.1),
    Speaker("s08", "en-us-nyc+f5", 172, 62, 0.60, 0.44, 0.92, 2.7),
]
TEXTS = ("grid", "open")  # SyntheticCorpusConfig.text: the six-slot grammar, or open-vocabulary sentences

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
    text: str = "grid"  # "grid": the six-slot grammar; "open": sentences of Debian's fortunes package
    held_out_speakers: bool = False  # test split spoken by HELD_OUT_SPEAKERS only, training by SPEAKERS only
    vocab_size: int | None = None  # "open" only: keep the sentences made of the pool's N most frequent words

    def __post_init__(self):
        if self.text not in TEXTS:
            raise ValueError(f"SyntheticCorpusConfig.text must be one of {TEXTS}, got {self.text!r}")
        if self.vocab_size is not None and (self.text != "open" or self.vocab_size < 1):
            raise ValueError(
                f"SyntheticCorpusConfig.vocab_size bounds the open corpus's words: it needs text='open' and a size "
                f">= 1, got text={self.text!r}, vocab_size={self.vocab_size}"
            )

    def fingerprint(self, sentences: list[str] | None = None) -> str:
        """A digest of everything the corpus depends on (``sentences``: the open-text pool, when used)."""
        speakers = [asdict(s) for s in SPEAKERS + HELD_OUT_SPEAKERS]
        config = asdict(self)
        if config["vocab_size"] is None:  # corpora built before the option existed keep their fingerprint
            del config["vocab_size"]
        payload = json.dumps([config, speakers, GRAMMAR, sorted(_VISEMES.items()), sentences])
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

    Train and test sentences are disjoint (the test set holds word combinations never seen in training; with
    ``text="open"``, sentences drawn from :func:`~recipes.avsr.data.sentences.fortune_sentences`, so test words may
    be new). Every speaker appears in both splits, or, with ``held_out_speakers``, the test split has its own
    (:data:`HELD_OUT_SPEAKERS`). Labels: ``root/labels/synth_{train,test}.csv``.
    """
    cfg = cfg or SyntheticCorpusConfig()
    root = Path(root)
    pool = _open_sentences(cfg.vocab_size) if cfg.text == "open" else None
    fingerprint = cfg.fingerprint(pool)
    stamp = root / "corpus.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return root
    ordered = _choose_sentences(cfg, pool)
    splits = {"test": ordered[: cfg.n_test], "train": ordered[cfg.n_test :]}
    (root / "labels").mkdir(parents=True, exist_ok=True)
    with EspeakNG() as tts:
        _write_splits(root, splits, tts, cfg)
    stamp.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "config": asdict(cfg),
                "words": vocabulary_stats(splits["train"], splits["test"]),
            },
            indent=1,
        )
    )
    return root


def _write_splits(root: Path, splits: dict[str, list[str]], tts: EspeakNG, cfg: SyntheticCorpusConfig) -> None:
    """The utterances' wav + mp4 files and the label files, in a fixed order (every draw follows it)."""
    from tqdm.auto import tqdm

    np_rng = np.random.default_rng(cfg.seed)
    for split, texts in splits.items():
        rows = []
        sub = "test" if split == "test" else "trainval"
        for k, text in enumerate(tqdm(texts, desc=f"synthesising {split}", leave=False)):
            voices = HELD_OUT_SPEAKERS if cfg.held_out_speakers and split == "test" else SPEAKERS
            speaker = voices[k % len(voices)]
            wave, frames = synthesize_utterance(tts, text, speaker, np_rng, cfg)
            rel = Path("synth_video") / sub / speaker.name / f"{k:05d}.mp4"
            out = root / "synth" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            write_video(out, frames)
            write_wav(out.with_suffix(".wav"), wave)
            rows.append(["synth", rel.as_posix(), len(frames), "", text])
        with open(root / "labels" / f"synth_{split}.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(rows)


def _open_sentences(vocab_size: int | None = None) -> list[str]:
    """The open-text pool, without the recorded-speech test set's transcripts (when that package is installed),
    bounded to the ``vocab_size`` most frequent words when given."""
    from .real_speech import POCKETSPHINX_DATA, pocketsphinx_utterances
    from .sentences import fortune_sentences, within_vocabulary

    recorded = [u.text for u in pocketsphinx_utterances()] if POCKETSPHINX_DATA.is_dir() else []
    pool = fortune_sentences(exclude=recorded)
    return pool if vocab_size is None else within_vocabulary(pool, vocab_size)


def _choose_sentences(cfg: SyntheticCorpusConfig, pool: list[str] | None) -> list[str]:
    """``n_test + n_train`` distinct sentences, test first: grammar samples, or a seeded sample of ``pool``."""
    n = cfg.n_train + cfg.n_test
    if pool is not None:
        if len(pool) < n:
            bounded = f" within --corpus_vocab {cfg.vocab_size} words" if cfg.vocab_size else ""
            raise ValueError(
                f"the open-text pool has {len(pool)} sentences{bounded}, fewer than --corpus_train + --corpus_test = "
                f"{n}: ask for fewer utterances{' or a larger --corpus_vocab' if bounded else ''}"
            )
        return random.Random(cfg.seed).sample(pool, n)
    rng = random.Random(cfg.seed)
    sentences: dict[str, None] = {}
    while len(sentences) < n:
        sentences.setdefault(random_sentence(rng), None)
    return list(sentences)
