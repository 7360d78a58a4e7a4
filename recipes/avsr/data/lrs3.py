"""LRS3 on disk: the two layouts, a manifest of utterances, and the train/test splits of a run.

Two on-disk layouts are read (those of Llama-AVSR and auto_avsr):

* **auto_avsr** (preprocessed LRS3): ``root/labels/*.csv``, rows ``dataset,rel_path,n_video_frames,token_ids,text``;
  the mouth-crop video is ``root/<dataset>/<rel_path>`` (``.mp4``) and its 16 kHz audio the same-stem ``.wav``.
* **raw** LRS3: ``root/{pretrain,trainval,test}/<speaker>/<utt>.mp4`` (face video with its audio track) and
  ``<utt>.txt`` whose first line is ``Text: ...``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .media import VIDEO_FPS, AVSRDataError


@dataclass
class Utterance:
    """One manifest row: where the streams of an utterance are and what is said."""

    uid: str
    video: str | None
    audio: str | None  # a .wav, or the .mp4 itself when the audio is its sound track (raw LRS3)
    text: str
    n_frames: int  # video frames at 25 fps (used for bucketing); 0 if unknown
    speaker: str = ""


def normalize_text(text: str) -> str:
    """Lower-case, keep letters, digits and apostrophes, collapse spaces (how WER is scored)."""
    kept = "".join(c if (c.isalnum() or c in "' ") else " " for c in text.lower())
    return " ".join(kept.split())


def write_manifest(utterances: Sequence[Utterance], path: str | Path) -> None:
    """Write one JSON object per line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for u in utterances:
            f.write(json.dumps(asdict(u)) + "\n")


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a manifest written by :func:`write_manifest`."""
    with open(path, encoding="utf-8") as f:
        return [Utterance(**json.loads(line)) for line in f if line.strip()]


def check_files(utterances: list[Utterance], modality: str) -> tuple[list[Utterance], list[str]]:
    """Keep utterances whose needed files exist; return them and one message per dropped utterance."""
    need_video, need_audio = modality in ("vsr", "avsr"), modality in ("asr", "avsr")
    kept, problems = [], []
    for u in utterances:
        missing = [
            p for p, need in ((u.video, need_video), (u.audio, need_audio)) if need and not (p and os.path.isfile(p))
        ]
        if missing:
            problems.append(f"{u.uid}: missing file {missing[0]}")
        else:
            kept.append(u)
    return kept, problems


def scan_auto_avsr(root: str | Path, csv_name: str) -> list[Utterance]:
    """Read an auto_avsr labels CSV (``root/labels/<csv_name>``) into utterances.

    Rows are ``dataset,rel_path,n_video_frames,token_ids,text`` (the five-column form that carries the text, as in
    Llama-AVSR); the video is ``root/dataset/rel_path`` and the audio the same-stem ``.wav``.
    """
    root = Path(root)
    path = root / "labels" / csv_name
    if not path.is_file():
        raise AVSRDataError(f"labels file {path} not found; expected auto_avsr labels under {root / 'labels'}")
    utterances = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) < 5:
                raise AVSRDataError(
                    f"{path}, line {i + 1}: {len(row)} columns; this loader needs `dataset,rel_path,n_video_frames,"
                    "token_ids,text` (the 5-column labels with text that Llama-AVSR uses)"
                )
            dataset, rel_path, n_frames, text = row[0], row[1], row[2], ",".join(row[4:])
            video = root / dataset / rel_path
            parts = Path(rel_path).with_suffix("").parts
            utterances.append(
                Utterance(
                    uid="/".join(parts[-3:]),
                    video=str(video),
                    audio=str(video.with_suffix(".wav")),
                    text=normalize_text(text),
                    n_frames=int(n_frames),
                    speaker=parts[-2] if len(parts) >= 2 else "",
                )
            )
    return utterances


def _read_raw_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first.startswith("Text:"):
        raise AVSRDataError(f"{path}: first line should start with 'Text:' (raw LRS3 transcript), got {first[:40]!r}")
    return normalize_text(first[len("Text:") :])


def scan_raw_lrs3(root: str | Path, subsets: Sequence[str]) -> list[Utterance]:
    """Read raw LRS3 folders ``root/<subset>/<speaker>/<utt>.mp4`` + ``<utt>.txt``; audio is the mp4's sound track."""
    root = Path(root)
    utterances = []
    for subset in subsets:
        folder = root / subset
        if not folder.is_dir():
            raise AVSRDataError(f"raw LRS3 folder {folder} not found (expected {root}/{{pretrain,trainval,test}})")
        for txt in sorted(folder.glob("*/*.txt")):
            mp4 = txt.with_suffix(".mp4")
            utterances.append(
                Utterance(
                    uid=f"{subset}/{txt.parent.name}/{txt.stem}",
                    video=str(mp4),
                    audio=str(mp4),
                    text=_read_raw_text(txt),
                    n_frames=0,
                    speaker=txt.parent.name,
                )
            )
    return utterances


def probe_frame_counts(utterances: Sequence[Utterance]) -> None:
    """Fill unknown ``n_frames`` from the video headers (PyAV; no decoding), for length bucketing."""
    import av

    for u in utterances:
        if u.n_frames or not u.video or not os.path.isfile(u.video):
            continue
        try:
            with av.open(u.video) as container:
                stream = container.streams.video[0]
                u.n_frames = stream.frames or int(float(stream.duration * stream.time_base) * VIDEO_FPS)
        except (OSError, av.error.FFmpegError, IndexError, TypeError):
            u.n_frames = 0  # decoding will report the file


def detect_layout(root: str | Path) -> str:
    """``"auto_avsr"`` when ``root/labels`` holds CSVs, ``"raw"`` when it holds LRS3 subset folders."""
    root = Path(root)
    if not root.is_dir():
        raise AVSRDataError(f"data directory {root} does not exist")
    if any((root / "labels").glob("*.csv")):
        return "auto_avsr"
    if any((root / s).is_dir() for s in ("trainval", "test", "pretrain")):
        return "raw"
    raise AVSRDataError(
        f"{root} is neither auto_avsr-preprocessed LRS3 (labels/*.csv) nor raw LRS3 ({{pretrain,trainval,test}}/)"
    )


def find_split_csv(root: str | Path, split: str) -> str:
    """The single CSV in ``root/labels`` whose name contains ``split`` (``train``/``val``/``test``)."""
    names = sorted(p.name for p in (Path(root) / "labels").glob("*.csv") if split in p.name)
    if len(names) != 1:
        raise AVSRDataError(
            f"expected exactly one labels CSV containing {split!r} in {Path(root) / 'labels'}, found {names}; "
            f"pass --{split}_csv"
        )
    return names[0]


def load_splits(
    root: str | Path,
    manifest_dir: str | Path,
    layout: str = "auto",
    train_csv: str | None = None,
    test_csv: str | None = None,
    raw_train_subsets: Sequence[str] = ("trainval",),
    max_test_utts: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[Utterance]]:
    """Train and test utterances under ``root``; writes ``manifest_{train,test}.jsonl`` to ``manifest_dir``.

    ``layout`` is ``"auto_avsr"``, ``"raw"`` or ``"auto"`` (detected); the auto_avsr CSVs default to the single one
    named ``*train*`` / ``*test*``; ``max_test_utts`` keeps only the first test utterances.
    """
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "auto_avsr":
        splits = {
            "train": scan_auto_avsr(root, train_csv or find_split_csv(root, "train")),
            "test": scan_auto_avsr(root, test_csv or find_split_csv(root, "test")),
        }
    else:
        splits = {"train": scan_raw_lrs3(root, raw_train_subsets), "test": scan_raw_lrs3(root, ["test"])}
        for utts in splits.values():
            probe_frame_counts(utts)
    if max_test_utts:
        splits["test"] = splits["test"][:max_test_utts]
    for name, utts in splits.items():
        write_manifest(utts, Path(manifest_dir) / f"manifest_{name}.jsonl")
        log(f"{name}: {len(utts)} utterances ({layout} layout, {root})")
    return splits


def check_mouth_crop(layout: str, mouth_box: Sequence[int] | None, uses_video: bool = True) -> None:
    """Warn when raw LRS3 face videos would feed the video stream without a mouth region (a centre crop of the
    whole face, not of the lips)."""
    if layout == "raw" and uses_video and mouth_box is None:
        warnings.warn(
            "raw LRS3 videos show whole faces: without --mouth_box the video stream is a centre crop of the face, "
            "not the mouth. Crop the mouths first with auto_avsr's landmark-based preprocessing (its preparation "
            "scripts: face landmarks -> 96x96 mouth region) and pass that auto_avsr layout as --data_dir, or give "
            "a fixed --mouth_box TOP LEFT H W",
            UserWarning,
            stacklevel=2,
        )
