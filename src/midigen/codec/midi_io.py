"""Reading and writing MIDI with symusic: the one reader of notes, a multi-track `NoteTable`."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import symusic
import symusic.core

from midigen.codec.timing import ticks_to_steps
from midigen.errors import BadMidiError

MIDI_SUFFIXES = (".mid", ".midi")
MAX_MIDI_BYTES = 64 * 1024 * 1024
# Text of the MIDI marker event that `midigen generate` writes where the continuation starts.
CONTINUATION_MARKER = "midigen: continuation"


DRUM_INSTRUMENT = 128  # the instrument key of drum notes; pitched notes' key is their General MIDI program


@dataclass
class NoteTable:
    """Every note of a MIDI file in ticks, with its instrument, plus the timing maps that place notes on a grid.

    One row per note, in the order of the file's tracks; `programs` is the track's General MIDI program (for
    drums, the kit), `drums` whether the track is a drum track (channel 10), `tracks` the index into `track_names`.
    """

    ticks_per_quarter: int
    onsets: np.ndarray  # (N,) int64 ticks
    durations: np.ndarray  # (N,) int64 ticks
    pitches: np.ndarray  # (N,) int64 0..127
    velocities: np.ndarray  # (N,) int64 0..127
    programs: np.ndarray  # (N,) int64 0..127
    drums: np.ndarray  # (N,) bool
    tracks: np.ndarray  # (N,) int64
    track_names: list[str]
    time_signatures: list[tuple[int, int, int]]  # (tick, numerator, denominator)
    tempos: list[tuple[int, float]]  # (tick, quarter notes per minute)
    path: str | None = None  # the file the notes came from, to name it in errors

    def __len__(self) -> int:
        return int(self.onsets.size)

    @property
    def instruments(self) -> np.ndarray:
        """(N,) each note's instrument key: its program, or `DRUM_INSTRUMENT` for drums."""
        return np.where(self.drums, DRUM_INSTRUMENT, self.programs)

    def select(self, keep: np.ndarray) -> NoteTable:
        """The notes where `keep` (N,) bool is True, with the same maps."""
        columns = ("onsets", "durations", "pitches", "velocities", "programs", "drums", "tracks")
        return replace(self, **{name: getattr(self, name)[keep] for name in columns})


def read_midi_bytes(path: str | Path) -> bytes:
    """The raw bytes of a MIDI file, or a `BadMidiError` saying why there are none."""
    try:
        # os-level calls: a file object costs more than reading a typical MIDI file does
        handle = os.open(path, os.O_RDONLY)
        try:
            status = os.fstat(handle)
            if stat.S_ISDIR(status.st_mode):  # which os.open, unlike open(), accepts
                raise BadMidiError(path, "is a folder, not a MIDI file")
            size = status.st_size
            if size == 0:
                raise BadMidiError(path, "empty file (0 bytes)")
            if size > MAX_MIDI_BYTES:
                raise BadMidiError(path, f"file too large: {size / 2**20:.0f} MiB > {MAX_MIDI_BYTES / 2**20:.0f} MiB")
            return os.read(handle, size)
        finally:
            os.close(handle)
    except FileNotFoundError:
        raise BadMidiError(path, "no such file") from None
    except PermissionError:
        raise BadMidiError(path, "permission denied") from None
    except OSError as exc:
        raise BadMidiError(path, f"cannot read: {exc.strerror or exc}") from None


def parse_midi(data: bytes, path: str | Path | None = None) -> symusic.Score:
    """Parse MIDI bytes with symusic, turning every failure into a one-line `BadMidiError`."""
    if len(data) == 0:
        raise BadMidiError(path, "empty file (0 bytes)")
    if data[:4] != b"MThd":
        if data[:4] == b"RIFF" and b"MThd" in data[:64]:
            data = data[data.index(b"MThd") :]  # RIFF-wrapped MIDI (.rmi)
        else:
            raise BadMidiError(path, "not a MIDI file (no MThd header)")
    try:
        return symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises plain RuntimeError/ValueError on malformed data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadMidiError(path, f"malformed MIDI: {reason}") from None


def load_score(source: str | Path | bytes | symusic.Score) -> symusic.Score:
    """A symusic Score from a path, raw bytes or a Score (in ticks)."""
    if isinstance(source, symusic.Score):
        return source if str(source.ttype).endswith("Tick") else source.to("tick")
    if isinstance(source, (bytes, bytearray)):
        return parse_midi(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        return parse_midi(read_midi_bytes(source), source)
    raise BadMidiError(None, f"expected a MIDI path, bytes or symusic.Score, got {type(source).__name__}")


def extract_notes(score: symusic.Score, path: str | Path | None = None) -> NoteTable:
    """The notes of every track (drums included) as one table."""
    if score.ticks_per_quarter < 1:
        raise BadMidiError(path, "malformed MIDI: 0 ticks per quarter note")
    merged = symusic.core.NoteTickList()  # merged in symusic: one conversion to numpy instead of one per track
    counts = []
    for track in score.tracks:
        merged.extend(track.notes)
        counts.append(track.note_num())
    if len(merged) == 0:
        raise BadMidiError(path, "no notes")
    columns = merged.numpy()
    tracks = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return NoteTable(
        ticks_per_quarter=int(score.ticks_per_quarter),
        onsets=columns["time"].astype(np.int64),
        durations=columns["duration"].astype(np.int64),
        pitches=columns["pitch"].astype(np.int64) & 0x7F,
        velocities=columns["velocity"].astype(np.int64) & 0x7F,
        programs=np.array([track.program & 0x7F for track in score.tracks], dtype=np.int64)[tracks],
        drums=np.array([track.is_drum for track in score.tracks], dtype=bool)[tracks],
        tracks=tracks,
        track_names=[track.name for track in score.tracks],
        # files hold few of these: a loop over them beats a conversion to numpy arrays
        time_signatures=[(s.time, s.numerator, s.denominator) for s in score.time_signatures
                         if s.numerator > 0 and s.denominator > 0],
        tempos=[(t.time, 60_000_000.0 / t.mspq) for t in score.tempos if t.mspq > 0],
        path=None if path is None else str(path),
    )


def read_notes(source: str | Path | bytes | symusic.Score) -> NoteTable:
    path = source if isinstance(source, (str, os.PathLike)) else None
    return extract_notes(load_score(source), path)


def tempo_map(notes: NoteTable, steps_per_quarter: int, default_qpm: float) -> tuple[tuple[int, float], ...]:
    """The file's tempo changes as (step, quarter notes per minute) on the grid, the first at step 0 (MIDI's
    default of 120 until the file's first change, `default_qpm` in a file without any); restatements dropped."""
    changes: list[tuple[int, float]] = [] if notes.tempos and notes.tempos[0][0] == 0 else [
        (0, default_qpm if not notes.tempos else 120.0)]
    for tick, qpm in notes.tempos:
        step = int(ticks_to_steps(tick, steps_per_quarter, notes.ticks_per_quarter))
        if changes and changes[-1][0] == step:
            changes.pop()  # the last change written at a step wins
        if not changes or changes[-1][1] != qpm:
            changes.append((step, float(qpm)))
    return tuple(changes)


def write_midi(score: symusic.Score, path: str | Path) -> None:
    """Write a score as a MIDI file atomically (temp file, then rename)."""
    from midigen.io_utils import atomic_write_with

    atomic_write_with(path, lambda tmp: score.dump_midi(str(tmp)))
