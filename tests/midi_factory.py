"""Synthetic MIDI files for tests: notes given on the step grid, written with symusic or by hand (type 0)."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import symusic
import symusic.core

GridNote = tuple[int, int, int]  # (onset step, pitch, duration in steps)
DRUM_CHANNEL = 9


def track_of(notes: Iterable[GridNote], ticks_per_step: int, name: str = "", is_drum: bool = False) -> symusic.Track:
    rows = np.array(list(notes), dtype=np.int64).reshape(-1, 3)
    track = symusic.Track(name, program=0, is_drum=is_drum)
    track.notes = symusic.Note.from_numpy(
        time=(rows[:, 0] * ticks_per_step).astype(np.int32),
        duration=(rows[:, 2] * ticks_per_step).astype(np.int32),
        pitch=rows[:, 1].astype(np.int8),
        velocity=np.full(len(rows), 90, dtype=np.int8),
    )
    return track


def tick_notes(rows: Sequence[tuple[int, int, int]]) -> symusic.core.NoteTickList:
    """symusic notes from (tick, pitch, duration in ticks)."""
    ticks, pitches, durations = (np.array(column, dtype=np.int64) for column in zip(*rows))
    return symusic.Note.from_numpy(
        time=ticks.astype(np.int32),
        duration=durations.astype(np.int32),
        pitch=pitches.astype(np.int8),
        velocity=np.full(len(rows), 90, dtype=np.int8),
    )


def make_score(
    tracks: Sequence[Iterable[GridNote]],
    steps_per_quarter: int = 8,
    ticks_per_step: int = 60,
    time_signatures: Sequence[tuple[int, int, int]] = (),
    tempos: Sequence[tuple[int, float]] = ((0, 120.0),),
    drum_tracks: Sequence[Iterable[GridNote]] = (),
) -> symusic.Score:
    """A score whose notes sit exactly on the grid: `ticks_per_quarter = steps_per_quarter * ticks_per_step`.

    Time signatures are (step, numerator, denominator), tempos (step, quarter notes per minute).
    """
    score = symusic.Score(steps_per_quarter * ticks_per_step)
    for step, numerator, denominator in time_signatures:
        score.time_signatures.append(symusic.TimeSignature(step * ticks_per_step, numerator, denominator))
    for step, qpm in tempos:
        score.tempos.append(symusic.Tempo(step * ticks_per_step, qpm))
    for i, notes in enumerate(tracks):
        score.tracks.append(track_of(notes, ticks_per_step, f"part {i}"))
    for notes in drum_tracks:
        score.tracks.append(track_of(notes, ticks_per_step, "drums", is_drum=True))
    return score


def write_score(path: Path, score: symusic.Score) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def million_note_score(count: int = 1_000_000) -> symusic.Score:
    """`count` short notes walking up and down the keyboard, one per step."""
    index = np.arange(count, dtype=np.int64)
    notes = np.stack([index, 21 + index % 88, np.ones(count, dtype=np.int64)], axis=1)
    return make_score([notes])


def grid_notes_of(score: symusic.Score, steps_per_quarter: int, keep_drums: bool = False) -> set[GridNote]:
    """The notes of a score on a grid (halves rounded up, at least one step), computed independently of midigen."""
    return set(grid_note_counts(score, steps_per_quarter, keep_drums))


def grid_note_counts(score: symusic.Score, steps_per_quarter: int, keep_drums: bool = False) -> Counter[GridNote]:
    """Like `grid_notes_of`, counting each note as often as the score has it (doubled voices, copied tracks)."""
    tpq = score.ticks_per_quarter
    result: Counter[GridNote] = Counter()
    for track in score.tracks:
        if track.is_drum and not keep_drums:
            continue
        for note in track.notes:
            onset = (2 * steps_per_quarter * note.time + tpq) // (2 * tpq)
            end = (2 * steps_per_quarter * (note.time + note.duration) + tpq) // (2 * tpq)
            result[onset, note.pitch, max(1, end - onset)] += 1
    return result


def _variable_length(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def type0_midi(
    notes: Sequence[tuple[int, int, int, int]], ticks_per_quarter: int, numerator: int = 4, denominator: int = 4
) -> bytes:
    """A type-0 MIDI file (one track, all channels) from (tick, pitch, duration ticks, channel) notes."""
    events: list[tuple[int, int, bytes]] = []  # (tick, order: note-offs first, message)
    for tick, pitch, duration, channel in notes:
        events.append((tick, 1, bytes([0x90 | channel, pitch, 100])))
        events.append((tick + duration, 0, bytes([0x80 | channel, pitch, 0])))
    header_events = [
        b"\x00\xff\x51\x03" + (500_000).to_bytes(3, "big"),
        b"\x00\xff\x58\x04" + bytes([numerator, denominator.bit_length() - 1, 24, 8]),
    ]
    body, now = b"".join(header_events), 0
    for tick, _, message in sorted(events):
        body += _variable_length(tick - now) + message
        now = tick
    body += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_quarter) + b"MTrk" + struct.pack(">I", len(body)) + body
