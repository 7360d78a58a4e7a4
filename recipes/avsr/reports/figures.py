"""The README's picture of the embedded corpus: log-mel and mouth frames of the first test utterances.

    python -m recipes.avsr.reports.figures --corpus runs/avsr/corpus --out docs/images/avsr_corpus.png

The corpus is built (or reused, when ``--corpus`` already holds the same one) with the recipe's default settings
(``--corpus_train 2 --corpus_test 2`` makes the same first two test utterances in seconds: the test split is
synthesised first, from the same seed).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from ..data.media import AUDIO_RATE, load_audio, load_video
from ..data.synthetic import SyntheticCorpusConfig, build_synthetic_corpus


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's 80-bin log-mel of ``wave`` (16 kHz), cut to its length: ``[80, frames at 100 Hz]``."""
    from transformers import WhisperFeatureExtractor

    seconds = max(1, int(np.ceil(len(wave) / AUDIO_RATE)))
    extractor = WhisperFeatureExtractor(chunk_length=seconds)
    mel = extractor(wave, sampling_rate=AUDIO_RATE, return_tensors="np").input_features[0]
    return mel[:, : len(wave) // extractor.hop_length]


def plot_corpus(root: str | Path, out: str | Path, n: int = 2, frame_step: int = 2) -> Path:
    """Plot the first ``n`` test utterances of a corpus in the auto_avsr layout (``labels/synth_test.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, out = Path(root), Path(out)
    with open(root / "labels" / "synth_test.csv", encoding="utf-8", newline="") as f:
        rows = [row for row in csv.reader(f) if row][:n]
    fig, axes = plt.subplots(2 * len(rows), 1, figsize=(8.4, 1.82 * len(rows)), height_ratios=[2.2, 1] * len(rows))
    for i, (dataset, rel, _, _, text) in enumerate(rows):
        video = root / dataset / rel
        frames = load_video(video)[::frame_step]
        speaker = Path(rel).parent.name
        axes[2 * i].imshow(log_mel(load_audio(video.with_suffix(".wav"))), aspect="auto", origin="lower", cmap="magma")
        axes[2 * i].set_title(
            f'{speaker}: "{text}" — log-mel (top), every {frame_step}nd mouth frame at 25 fps (bottom)', fontsize=8
        )
        axes[2 * i + 1].imshow(np.concatenate(list(np.pad(frames, ((0, 0), (0, 0), (0, 4)), constant_values=255)), 1),
                               cmap="gray", vmin=0, vmax=255)  # fmt: skip
        for ax in axes[2 * i : 2 * i + 2]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="recipes.avsr.reports.figures", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="runs/avsr/corpus", help="where the embedded corpus is (built if missing)")
    p.add_argument("--out", default="docs/images/avsr_corpus.png")
    p.add_argument("--corpus_train", type=int, default=1200)
    p.add_argument("--corpus_test", type=int, default=120)
    args = p.parse_args(argv)
    root = build_synthetic_corpus(
        args.corpus, SyntheticCorpusConfig(n_train=args.corpus_train, n_test=args.corpus_test)
    )
    print(plot_corpus(root, args.out))


if __name__ == "__main__":
    main()
