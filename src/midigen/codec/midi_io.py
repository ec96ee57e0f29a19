"""Reading and writing MIDI with symusic: notes of all non-drum tracks merged into one stream."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
import symusic.core

from midigen.errors import BadMidiError

MIDI_SUFFIXES = (".mid", ".midi")
MAX_MIDI_BYTES = 64 * 1024 * 1024
# Text of the MIDI marker event that `midigen generate` writes where the continuation starts.
CONTINUATION_MARKER = "midigen: continuation"


@dataclass
class MidiNotes:
    """Notes in ticks, merged across tracks, plus the timing maps needed to place them on a grid."""

    ticks_per_quarter: int
    onsets: np.ndarray  # (N,) int64 ticks
    durations: np.ndarray  # (N,) int64 ticks
    pitches: np.ndarray  # (N,) int64 0..127
    time_signatures: list[tuple[int, int, int]]  # (tick, numerator, denominator)
    tempos: list[tuple[int, float]]  # (tick, quarter notes per minute)
    path: str | None = None  # the file the notes came from, to name it in errors

    def __len__(self) -> int:
        return int(self.onsets.size)


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


def extract_notes(score: symusic.Score, keep_drums: bool, path: str | Path | None = None) -> MidiNotes:
    """Merge the notes of all (non-drum) tracks into one stream of arrays."""
    if score.ticks_per_quarter < 1:
        raise BadMidiError(path, "malformed MIDI: 0 ticks per quarter note")
    merged = symusic.core.NoteTickList()  # merged in symusic: one conversion to numpy instead of one per track
    drum_notes = 0
    for track in score.tracks:
        if track.is_drum and not keep_drums:
            drum_notes += track.note_num()
        else:
            merged.extend(track.notes)
    if len(merged) == 0:
        raise BadMidiError(path, "only drum notes (drums are dropped)" if drum_notes else "no notes")
    columns = merged.numpy()
    return MidiNotes(
        ticks_per_quarter=int(score.ticks_per_quarter),
        onsets=columns["time"].astype(np.int64),
        durations=columns["duration"].astype(np.int64),
        pitches=columns["pitch"].astype(np.int64) & 0x7F,
        # files hold few of these: a loop over them beats a conversion to numpy arrays
        time_signatures=[(s.time, s.numerator, s.denominator) for s in score.time_signatures
                         if s.numerator > 0 and s.denominator > 0],
        tempos=[(t.time, 60_000_000.0 / t.mspq) for t in score.tempos if t.mspq > 0],
        path=None if path is None else str(path),
    )


def read_notes(source: str | Path | bytes | symusic.Score, keep_drums: bool = False) -> MidiNotes:
    path = source if isinstance(source, (str, os.PathLike)) else None
    return extract_notes(load_score(source), keep_drums, path)


def first_tempo(notes: MidiNotes, default: float) -> float:
    return notes.tempos[0][1] if notes.tempos else default


def write_midi(score: symusic.Score, path: str | Path) -> None:
    """Write a score as a MIDI file atomically (temp file, then rename)."""
    from midigen.io_utils import atomic_write_with

    atomic_write_with(path, lambda tmp: score.dump_midi(str(tmp)))
