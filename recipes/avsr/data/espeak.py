"""espeak-ng speech with phoneme timings, synthesised in a worker process (:class:`EspeakNG`).

The embedded corpus (:mod:`recipes.avsr.data.synthetic`) speaks its sentences with it. Requests and replies go
through pickle between this process and its own worker only; nothing read from disk is unpickled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

_PACKAGE_ROOT = Path(__file__).resolve().parents[len(__name__.split(".")) - 1]  # the folder that holds `recipes`


class _EspeakLibrary:
    """espeak-ng's C library (``libespeak-ng``, Debian package ``espeak-ng``) in this process: audio plus phoneme
    timings. Only :class:`EspeakNG`'s worker process loads it (see there why).

    The command line offers phoneme timings only with MBROLA voices; the library reports a phoneme event with its
    audio position for every phoneme of any voice.
    """

    _EVENT_PHONEME = 7  # espeak_EVENT_TYPE: espeakEVENT_PHONEME

    class _Event(ctypes.Structure):
        class _Id(ctypes.Union):
            _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

        _fields_ = [
            ("type", ctypes.c_int),
            ("unique_identifier", ctypes.c_uint),
            ("text_position", ctypes.c_int),
            ("length", ctypes.c_int),
            ("audio_position", ctypes.c_int),
            ("sample", ctypes.c_int),
            ("user_data", ctypes.c_void_p),
            ("id", _Id),
        ]

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as err:
            raise RuntimeError(
                "the embedded corpus needs espeak-ng's library: `apt-get install espeak-ng` (scripts/setup.sh does it)"
            ) from err
        # espeak-ng's breath noise draws from libc's rand(): start it from glibc's initial state (seed 1), whatever
        # this process imported before
        ctypes.CDLL(None).srand(1)
        # AUDIO_OUTPUT_SYNCHRONOUS=2; options: PHONEME_EVENTS | DONT_EXIT
        self.sample_rate = self._lib.espeak_Initialize(2, 500, None, 0x0001 | 0x8000)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed: is espeak-ng-data installed?")
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(self._Event)
        )
        self._callback = callback_type(self._on_audio)  # keep a reference: the library calls it later
        self._lib.espeak_SetSynthCallback(self._callback)
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[tuple[float, str]] = []

    def _on_audio(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:
            if events[i].type == self._EVENT_PHONEME:
                self._phonemes.append(
                    (events[i].audio_position / 1000.0, events[i].id.string.decode(errors="replace"))
                )
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, list[tuple[float, str]]]:
        """See :meth:`EspeakNG.synthesize`."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (see `espeak-ng --voices=en`)")
        self._lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE
        self._lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
        self._chunks, self._phonemes = [], []
        data = text.encode() + b"\0"
        # position 0, POS_CHARACTER=1, end 0, flags espeakCHARS_UTF8=1
        self._lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)
        self._lib.espeak_Synchronize()
        wave = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
        return wave, list(self._phonemes)


def _serve_espeak() -> None:
    """The worker of :class:`EspeakNG` (``python -m recipes.avsr.data.espeak``): answers pickled requests on stdin
    with pickled ``("ok", result)`` or ``("error", message)`` replies on stdout; the first reply is the sample rate.
    Ends at the end of stdin."""
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the library prints goes to stderr, not into the replies
    try:
        library = _EspeakLibrary()
        reply: tuple = ("ok", library.sample_rate)
    except RuntimeError as err:
        library, reply = None, ("error", str(err))
    while True:
        pickle.dump(reply, replies)
        replies.flush()
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            if library is None:
                raise RuntimeError(reply[1])
            reply = ("ok", library.synthesize(*request))
        except RuntimeError as err:
            reply = ("error", str(err))


class EspeakNG:
    """espeak-ng speech with phoneme timings, from a worker process of this instance's own.

    The library keeps state from one utterance to the next that its API cannot reset (the re-initialised library
    still carries it), and draws noise from libc's process-wide ``rand()``, which any other library can advance: in
    a long-lived process the same sentence came out with other samples and other phoneme timings (so other mouth
    frames) depending on everything synthesised before. In a fresh process, the output depends only on the calls
    made to this instance, in order: the same corpus configuration gives the same corpus.
    """

    def __init__(self):
        self._worker = subprocess.Popen(
            [sys.executable, "-m", __name__],
            cwd=_PACKAGE_ROOT,  # `python -m` imports from the working folder: the one that holds `recipes`
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            self.sample_rate: int = self._reply()
        except RuntimeError:
            self.close()
            raise

    def _reply(self):
        try:
            status, value = pickle.load(self._worker.stdout)
        except EOFError:
            raise RuntimeError(
                f"the espeak-ng worker ended (exit code {self._worker.wait()}); see its stderr"
            ) from None
        if status != "ok":
            raise RuntimeError(value)
        return value

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, list[tuple[float, str]]]:
        """Speak ``text``; returns float32 samples at :attr:`sample_rate` and ``(start_seconds, phoneme)`` pairs."""
        pickle.dump((text, voice, int(rate), int(pitch)), self._worker.stdin)
        self._worker.stdin.flush()
        return self._reply()

    def close(self) -> None:
        """End the worker (also at exit of a ``with`` block, and when the instance is collected)."""
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.returncode is None:
            worker.stdin.close()
            worker.wait()
            worker.stdout.close()

    def __enter__(self) -> EspeakNG:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


if __name__ == "__main__":
    _serve_espeak()
