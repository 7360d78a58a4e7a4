"""Audio and video files of the AVSR recipe: decoding with maintained libraries, writing, and the stream rates.

Video is decoded with PyAV (mp4), wav audio with soundfile, the sound track of an mp4 with PyAV. A file that cannot
be read raises :class:`AVSRDataError` naming it: zero bytes, not a media file, truncated (an mp4 fails to decode; a
wav holding fewer samples than its header declares, which soundfile would read short without a word), a wav at
another rate than 16 kHz (an mp4's sound track is resampled), a video without frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

AUDIO_RATE = 16_000  # Hz, what every audio encoder here expects
VIDEO_FPS = 25  # frames per second of LRS3 and of the synthetic corpus
SAMPLES_PER_FRAME = AUDIO_RATE // VIDEO_FPS  # 640 audio samples per video frame


class AVSRDataError(RuntimeError):
    """A file of the corpus is missing or cannot be decoded; the message names the file."""


def load_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video as grayscale ``uint8 [T, H, W]`` with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AVSRDataError(f"video {path} has no frames (no video stream)")
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    except (OSError, av.error.FFmpegError, ValueError, IndexError) as err:
        raise AVSRDataError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise AVSRDataError(f"video {path} has no frames")
    return np.stack(frames)


def load_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz: a ``.wav`` through soundfile, an ``.mp4`` sound track through PyAV."""
    path = str(path)
    if path.endswith(".mp4"):
        return _load_mp4_audio(path)
    import soundfile

    try:
        wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise AVSRDataError(f"cannot read audio {path}: {err}") from err
    if rate != AUDIO_RATE:
        raise AVSRDataError(
            f"audio {path} is {rate} Hz; resample it to {AUDIO_RATE} Hz (auto_avsr's preprocessing does)"
        )
    if wave.shape[0] == 0:
        raise AVSRDataError(f"audio {path} is empty")
    missing = wav_missing_bytes(path) if path.lower().endswith(".wav") else 0
    if missing:
        raise AVSRDataError(
            f"audio {path} is truncated: {missing} bytes of the samples its header declares are missing; "
            "copy or extract it again"
        )
    return wave.mean(axis=1)


def wav_missing_bytes(path: str | Path) -> int:
    """How many bytes of sample data a RIFF/WAVE file lacks against its ``data`` chunk's declared size (0: none, or
    the size is not declared, as streaming writers leave it, or the file is not a plain RIFF/WAVE file)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return 0
        while len(chunk := f.read(8)) == 8:
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                present = os.fstat(f.fileno()).st_size - f.tell()
                return 0 if size in (0, 0xFFFFFFFF) else max(size - present, 0)
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return 0


def _load_mp4_audio(path: str) -> np.ndarray:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AVSRDataError(
                    f"{path} has no audio track (asr/avsr need one; use --modality vsr, or give its audio as a "
                    "same-stem .wav in the auto_avsr layout)"
                )
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks = []
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (OSError, av.error.FFmpegError, ValueError, IndexError) as err:
        raise AVSRDataError(f"cannot decode the audio track of {path}: {err}") from err
    if not chunks:
        raise AVSRDataError(f"{path} has no audio samples")
    return np.concatenate(chunks).astype(np.float32)


def cut_or_pad(wave: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad ``wave`` to ``n`` samples (keeps audio and video the same length, as auto_avsr does)."""
    return wave[:n] if wave.shape[0] >= n else np.pad(wave, (0, n - wave.shape[0]))


def write_video(path: str | Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Encode grayscale ``uint8 [T, H, W]`` frames as H.264 mp4 with PyAV, on one thread.

    One thread, because libx264 otherwise picks its thread count from the CPUs this process may use, and the
    bitstream depends on it: 160 px frames were cut into one slice per CPU, so the same frames decoded to other
    pixels under another CPU count. The corpus's 48 px frames (and 96 px ones) got one thread anyway: same bytes.

    Without x264's assembly (``asm=0``, its portable C code): on an AVX-512 CPU its assembly encoded the same frames
    to other bytes from one call to the next, depending on what the process had allocated before (memory read but
    never written), so two builds of a corpus differed; the C code gives the same bytes every time, on any CPU.
    """
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast", "x264-params": "asm=0"}
        stream.codec_context.thread_count = 1
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_wav(path: str | Path, wave: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Write 16-bit PCM with soundfile."""
    import soundfile

    soundfile.write(str(path), wave, rate, subtype="PCM_16")
