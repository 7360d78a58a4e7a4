"""Real recorded speech for an ASR test set: Debian's ``pocketsphinx-testdata`` as an LRS3-style manifest.

The package ships 10 recorded 16 kHz mono utterances with transcripts: 5 read sentences from a LibriVox recording of
*Sense and Sensibility* (3 to 7 s, one speaker) and 5 spoken playing-card phrases (1 to 3.5 s, "ten of clubs").
Audio only (no video): an ASR test set. Ten utterances from two speakers can show that a recogniser works on real
recorded speech and roughly how well (a WER to within tens of points), not a difference between two systems.

    apt-get install -y pocketsphinx-testdata     # scripts/setup.sh does this
"""

from __future__ import annotations

import re
from pathlib import Path

import soundfile as sf

from .lrs3 import Utterance, write_manifest
from .media import VIDEO_FPS

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
# (folder, transcription file) of the recorded sets; each line reads "<s> words </s> (file id)"
SETS = (("librivox", "transcription"), ("cards", "cards.transcription"))
_LINE = re.compile(r"^\s*(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<uid>[^()]+)\)\s*$")


def pocketsphinx_utterances(root: str | Path = POCKETSPHINX_DATA) -> list[Utterance]:
    """The recorded utterances of ``pocketsphinx-testdata`` as manifest rows (audio only, speaker = set name).

    Raises:
        FileNotFoundError: the package is not installed (names the apt command) or a listed recording is missing.
        ValueError: a transcription line is not ``<s> words </s> (id)``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} not found: install it with `apt-get install -y pocketsphinx-testdata` (scripts/setup.sh does), "
            "or pass --no-real_speech_test to skip the recorded-speech test set."
        )
    rows = []
    for folder, listing in SETS:
        lines = (root / folder / listing).read_text(encoding="utf-8").splitlines()
        for line in filter(str.strip, lines):
            match = _LINE.match(line)
            if match is None:
                raise ValueError(f"{root / folder / listing}: cannot read the transcription line {line!r}.")
            wav = root / folder / f"{match['uid']}.wav"
            if not wav.is_file():
                raise FileNotFoundError(f"{wav} is listed in {listing} but missing; reinstall pocketsphinx-testdata.")
            info = sf.info(str(wav))
            if info.samplerate != 16000 or info.channels != 1:
                raise ValueError(f"{wav}: expected 16 kHz mono, got {info.samplerate} Hz x {info.channels}.")
            frames = round(info.duration * VIDEO_FPS)
            rows.append(Utterance(f"{folder}/{match['uid']}", None, str(wav), match["text"], frames, folder))
    return rows


def write_real_speech_manifest(path: str | Path, root: str | Path = POCKETSPHINX_DATA) -> Path:
    """Write the recorded utterances as a manifest (one JSON per line, read by ``read_manifest``); returns the path."""
    write_manifest(pocketsphinx_utterances(root), path)
    return Path(path)
