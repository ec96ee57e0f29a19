"""Audio to MIDI with Spotify's basic-pitch, its ONNX model run by onnxruntime (never TensorFlow).

`transcribe` turns a WAV, FLAC, MP3 or OGG clip (a hummed or played tune) into a MIDI file in this process:
`midigen transcribe` uses it. `Transcriber` runs it in a worker process of its own for the studio, so that a
clip that crashes or hangs the audio decoder costs that clip and not the server, and warms the worker up
when it starts (basic-pitch's first call takes seconds; later ones a fraction of a second).

basic-pitch is installed without its dependencies (they would pull TensorFlow); midigen's `audio` extra
lists what it needs.
"""

from __future__ import annotations

import logging
import math
import re
import multiprocessing.connection
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from midigen.errors import MidigenError
from midigen.workers import death_reason

MAX_AUDIO_SECONDS = 60.0
AUDIO_FORMATS = "WAV, FLAC, MP3 or OGG"
INSTALL_HINT = "pip install 'midigen[audio]' && pip install --no-deps 'basic-pitch==0.4.*'"
# basic-pitch's own settings for turning its note and onset activations into notes
ONSET_THRESHOLD = 0.5
FRAME_THRESHOLD = 0.3
MIN_NOTE_MS = 127.7
TEMPO_QPM = 120.0
WARM_UP_SECONDS = 1.0
WARM_UP_PITCH = 69  # A4, a sung pitch


def _basic_pitch() -> tuple[Any, Any, Any]:
    """basic-pitch's inference and note-creation modules and its ONNX model path, imported quietly (it warns
    on import about every backend it does not find, TensorFlow included, which we never want)."""
    logging.disable(logging.WARNING)
    try:
        import basic_pitch
        import basic_pitch.note_creation as note_creation
        from basic_pitch import inference
    except ImportError as exc:
        raise MidigenError(f"audio prompts need basic-pitch and onnxruntime ({exc}): {INSTALL_HINT}") from None
    finally:
        logging.disable(logging.NOTSET)
    if not basic_pitch.ONNX_PRESENT:
        raise MidigenError(f"audio prompts need onnxruntime: {INSTALL_HINT}")
    return inference, note_creation, basic_pitch.build_icassp_2022_model_path(basic_pitch.FilenameSuffix.onnx)


_model_lock = threading.Lock()
_model: Any = None


def _loaded_model() -> Any:
    global _model
    with _model_lock:
        if _model is None:
            inference, _, path = _basic_pitch()
            _model = inference.Model(path)
        return _model


def audio_seconds(path: Path) -> float:
    """The clip's length, from its header; a one-line `MidigenError` if it is not audio that can be read."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as exc:  # noqa: BLE001 (libsndfile's errors come as several types)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^Error opening .*?: ", "", reason)  # libsndfile repeats the path
        raise MidigenError(f"{path}: not audio that can be read ({AUDIO_FORMATS}): {reason}") from None
    if not (info.frames > 0 and info.samplerate > 0):
        raise MidigenError(f"{path}: the audio holds no samples")
    return info.frames / info.samplerate


def transcribe(audio: str | Path, midi: str | Path) -> int:
    """Write the notes heard in `audio` to the MIDI file `midi` (at 120 quarter notes per minute, so that
    seconds map to beats simply); returns how many. A clip over `MAX_AUDIO_SECONDS`, one that is not
    audio, or one in which no note is heard gets a one-line `MidigenError`."""
    from midigen.io_utils import atomic_write_with

    audio, midi = Path(audio), Path(midi)
    seconds = audio_seconds(audio)
    if seconds > MAX_AUDIO_SECONDS:
        raise MidigenError(f"{audio}: {seconds:.0f} s of audio; the limit is {MAX_AUDIO_SECONDS:.0f} s")
    inference, note_creation, _ = _basic_pitch()
    from basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP

    try:
        activations = inference.run_inference(audio, _loaded_model())
    except Exception as exc:  # noqa: BLE001 (a decoder or model failure on this clip is the clip's error)
        raise MidigenError(f"{audio}: cannot transcribe: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    min_frames = int(round(MIN_NOTE_MS / 1000 * (AUDIO_SAMPLE_RATE / FFT_HOP)))
    midi_data, notes = note_creation.model_output_to_notes(
        activations, onset_thresh=ONSET_THRESHOLD, frame_thresh=FRAME_THRESHOLD, min_note_len=min_frames,
        min_freq=None, max_freq=None, multiple_pitch_bends=False, melodia_trick=True, midi_tempo=TEMPO_QPM)
    if not notes:
        raise MidigenError(f"{audio}: no notes heard in {seconds:.1f} s of audio")
    atomic_write_with(midi, lambda tmp: midi_data.write(str(tmp)))
    return len(notes)


def write_tone(path: Path, pitch: int, seconds: float, sample_rate: int = 22050) -> None:
    """A sine tone as a 16-bit WAV: what the worker warms up on."""
    import soundfile

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)
    soundfile.write(str(path), 0.5 * fade * np.sin(2 * math.pi * 440.0 * 2 ** ((pitch - 69) / 12) * t), sample_rate,
                    subtype="PCM_16")


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The worker: warm up, say so, then transcribe each (audio, midi) pair it receives until its pipe closes."""
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="midigen-warm-up-") as scratch:
            write_tone(Path(scratch) / "tone.wav", WARM_UP_PITCH, WARM_UP_SECONDS)
            transcribe(Path(scratch) / "tone.wav", Path(scratch) / "tone.mid")
        conn.send(("ready", time.perf_counter() - started))
    except MidigenError as exc:
        conn.send(("unavailable", str(exc)))
        return
    while True:
        try:
            audio, midi = conn.recv()
        except (EOFError, OSError):
            return  # the studio has gone
        try:
            conn.send(("ok", transcribe(audio, midi)))
        except MidigenError as exc:
            conn.send(("error", str(exc)))
        except Exception as exc:  # noqa: BLE001 (the clip's failure, whatever it is, is reported, not fatal)
            conn.send(("error", f"{audio}: cannot transcribe: {type(exc).__name__}: {exc}".splitlines()[0]))


class Transcriber:
    """basic-pitch in a worker process, started (and warmed up) at once; one clip at a time.

    A clip that crashes the worker, or takes longer than `timeout_s` plus twice its length, gets a one-line
    `MidigenError`; the worker is replaced (and warmed up again) for the next one.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._state = "starting"
        self._start()

    @property
    def state(self) -> str:
        """The worker's state: warming up, ready, or unavailable: <reason>."""
        if self._state == "warming up" and self._conn is not None and self._lock.acquire(blocking=False):
            try:
                self._await_ready(0.0)
            finally:
                self._lock.release()
        return self._state

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the server's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="midigen-transcriber", daemon=True)
        self._process.start()
        child.close()
        self._state = "warming up"

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()  # type: ignore[union-attr]
            self._process = self._conn = None

    def _await_ready(self, timeout_s: float) -> None:
        """Take the worker's word that it has warmed up, if it has come within `timeout_s`."""
        assert self._conn is not None
        if not self._conn.poll(timeout_s):
            return
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            self._state = f"unavailable: the transcriber died while warming up ({death_reason(self._exitcode())})"
            self._stop()
            return
        self._state = "ready" if kind == "ready" else f"unavailable: {detail}"

    def _exitcode(self) -> int | None:
        self._process.join(timeout=1)
        return self._process.exitcode

    def transcribe(self, audio: Path, midi: Path) -> int:
        """`transcribe(audio, midi)` in the worker; see the class."""
        with self._lock:
            if self._process is None:
                self._start()
            if self._state == "warming up":
                self._await_ready(self.timeout_s + 120.0)  # the first start of basic-pitch compiles its kernels
            if self._state != "ready":
                raise MidigenError(f"audio prompts are {self._state}" if self._state != "warming up"
                                   else "audio prompts are not ready: the transcriber is still warming up")
            assert self._conn is not None
            budget = self.timeout_s + 2 * MAX_AUDIO_SECONDS
            try:
                self._conn.send((str(audio), str(midi)))
                kind, detail = self._conn.recv() if self._conn.poll(budget) else ("timeout", None)
            except (EOFError, OSError):  # the worker has died (before or while it answered)
                kind, detail = "died", None
            if kind in ("ok", "error"):
                if kind == "error":
                    raise MidigenError(detail)
                return int(detail)
            reason = (f"the transcriber took longer than {budget:.0f} s" if kind == "timeout" else
                      f"the audio decoder crashed ({death_reason(self._exitcode())})")
            self._stop()
            self._start()
            raise MidigenError(f"{audio}: {reason}")

    def close(self) -> None:
        with self._lock:
            self._stop()
