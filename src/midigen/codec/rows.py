"""Notes and gaps as integer rows: the array operations the seed codec's encoders share (one sort for many songs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import NoteTable
from midigen.codec.timing import BarGrid, ticks_to_steps
from midigen.errors import BadMidiError

GAP = -1  # pitch column value of a gap row in a position score
MAX_SONG_STEPS = 2**24  # about 24 days at 120 qpm and 8 steps per quarter; steps are stored as uint32
# Packed sort key of a note: song (of a batch), then step (up to MAX_SONG_STEPS), then 127 - pitch,
# then 0xFFFF - duration.
KEY_PITCH_SHIFT = 16
KEY_STEP_SHIFT = 23
KEY_STEP_MASK = 2 * MAX_SONG_STEPS - 1  # steps go up to MAX_SONG_STEPS itself
KEY_SONG_SHIFT = KEY_STEP_SHIFT + KEY_STEP_MASK.bit_length()
KEY_DURATION_MASK = 0xFFFF
MAX_BATCH_SONGS = 2 ** (63 - KEY_SONG_SHIFT)
ROW_SONG = 3  # the song column of position rows built for a batch of songs


@dataclass
class PositionScore:
    """Rows of (pitch, duration, step); a gap row (pitch = GAP, duration = gap) precedes each new onset group."""

    rows: np.ndarray  # (R, 3) int64
    grid: BarGrid

    PITCH, DURATION, STEP = 0, 1, 2


def song_of_each(counts: Sequence[int]) -> np.ndarray:
    """For songs of `counts` notes laid one after the other, the song of each note."""
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def sort_notes(
    songs: np.ndarray, steps: np.ndarray, pitches: np.ndarray, durations: np.ndarray, merge_unisons: bool,
    num_songs: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Notes of `num_songs` songs sorted by song, step, then highest pitch first, then longest first;
    with `merge_unisons`, of several notes with the same song, step and pitch only the longest is kept.
    Returns (steps, pitches, durations, number of notes dropped per song)."""
    # one sort on a packed key: song, step, then pitch descending, then duration descending
    key = np.sort((songs << KEY_SONG_SHIFT) | (steps << KEY_STEP_SHIFT) | ((127 - pitches) << KEY_PITCH_SHIFT)
                  | (KEY_DURATION_MASK - durations))
    kept, dropped = key, np.zeros(num_songs, dtype=np.int64)
    if merge_unisons:
        song_step_pitch = key >> KEY_PITCH_SHIFT
        keep = np.empty(key.size, dtype=bool)
        keep[:1] = True
        np.not_equal(song_step_pitch[1:], song_step_pitch[:-1], out=keep[1:])
        kept = key[keep]
        dropped = np.bincount(key[~keep] >> KEY_SONG_SHIFT, minlength=num_songs)
    return (
        (kept >> KEY_STEP_SHIFT) & KEY_STEP_MASK,
        127 - ((kept >> KEY_PITCH_SHIFT) & 127),
        KEY_DURATION_MASK - (kept & KEY_DURATION_MASK),
        dropped,
    )


def position_rows(steps: np.ndarray, pitches: np.ndarray, durations: np.ndarray,
                  songs: np.ndarray | None = None) -> np.ndarray:
    """Rows of (pitch, duration, step) of sorted notes, with a gap row before each new onset group.

    With `songs` (the notes of several songs, sorted by song first), a fourth column (`ROW_SONG`)
    holds each row's song, and every song starts at step 0.
    """
    previous = np.empty_like(steps)
    previous[:1] = 0
    previous[1:] = steps[:-1]
    columns = 3
    if songs is not None:
        previous[1:][songs[1:] != songs[:-1]] = 0
        columns = 4
    # a gap row, then a note row, for every note; the gap rows of notes that open no new group
    # (steps are sorted, so a group opens where the step changes) are dropped
    slots = np.empty((steps.size, 2, columns), dtype=np.int64)
    slots[:, 0, PositionScore.PITCH] = GAP
    np.subtract(steps, previous, out=slots[:, 0, PositionScore.DURATION])
    slots[:, 0, PositionScore.STEP] = previous
    slots[:, 1, PositionScore.PITCH] = pitches
    slots[:, 1, PositionScore.DURATION] = durations
    slots[:, 1, PositionScore.STEP] = steps
    if songs is not None:
        slots[:, :, ROW_SONG] = songs[:, None]
    keep = np.empty((steps.size, 2), dtype=bool)
    np.not_equal(steps, previous, out=keep[:, 0])
    keep[:, 1] = True
    return slots.reshape(-1, columns)[keep.ravel()]


def split_long_gaps(rows: np.ndarray, max_dur: int) -> np.ndarray:
    """Position rows (R, 3 or 4) with each gap longer than `max_dur` split into full `max_dur` gaps and the rest."""
    length, is_gap = rows[:, PositionScore.DURATION], rows[:, PositionScore.PITCH] == GAP
    pieces = np.where(is_gap, -(-length // max_dur), 1)
    row = np.repeat(np.arange(rows.shape[0]), pieces)
    piece = np.arange(row.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    split, gap = rows[row], is_gap[row]
    elapsed = piece[gap] * max_dur  # of the gap, before this piece
    split[gap, PositionScore.DURATION] = np.minimum(max_dur, split[gap, PositionScore.DURATION] - elapsed)
    split[gap, PositionScore.STEP] += elapsed
    return split


def quantised_steps(files: Sequence[NoteTable], songs: np.ndarray, steps_per_quarter: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each note's onset step and its length in steps, unclamped (end step − onset step, the nearest steps, halves
    up), for the notes of several files one after the other (each note's file in `songs`).

    Raises `BadMidiError` naming the first file with a note beyond `MAX_SONG_STEPS` or before 0.
    """
    tpq = np.array([notes.ticks_per_quarter for notes in files], dtype=np.int64)[songs]
    ticks = np.concatenate([notes.onsets for notes in files])
    onsets = ticks_to_steps(ticks, steps_per_quarter, tpq)
    out_of_range = (onsets < 0) | (onsets > MAX_SONG_STEPS)
    if out_of_range.any():
        raise BadMidiError(files[int(songs[out_of_range.argmax()])].path,
                           f"timing out of range: notes beyond step {MAX_SONG_STEPS} or before 0")
    ends = ticks_to_steps(ticks + np.concatenate([notes.durations for notes in files]), steps_per_quarter, tpq)
    return onsets, ends - onsets


def grid_of(notes: NoteTable, config: TokenizerConfig) -> BarGrid:
    """The bar grid of a piece's time-signature map, in steps."""
    changes = tuple(
        (ticks_to_steps(tick, config.steps_per_quarter, notes.ticks_per_quarter), numerator, denominator)
        for tick, numerator, denominator in notes.time_signatures
    )
    return BarGrid.of(changes, config.steps_per_quarter, config.beat_positions)


def ticks_per_quarter_of(config: TokenizerConfig) -> int:
    spq = config.steps_per_quarter
    return 480 if 480 % spq == 0 else spq * 60


def overlap_layers(keys: np.ndarray, steps: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """For each note, the lowest layer in which no earlier note of the same key (e.g. instrument and pitch)
    still sounds (N,); 0 for most. One MIDI track cannot hold two sounding notes of one pitch, so each further
    layer becomes a track of its own."""
    keys, steps, durations = (np.asarray(a, dtype=np.int64) for a in (keys, steps, durations))
    order = np.lexsort((steps, keys))  # by key, then onset
    steps, keys = steps[order], keys[order]
    ends = steps + durations[order]
    offset = (keys - int(keys.min(initial=0))) * (int(ends.max(initial=0)) + 1)
    latest_end = np.maximum.accumulate(ends + offset) - offset if ends.size else ends
    overlaps = np.zeros(order.size, dtype=bool)
    overlaps[1:] = (keys[1:] == keys[:-1]) & (steps[1:] < latest_end[:-1])
    layers = np.zeros(order.size, dtype=np.int64)
    for key in np.unique(keys[overlaps]).tolist():  # rare: lay out only the keys that need it
        layer_ends: list[int] = []
        for index in np.flatnonzero(keys == key).tolist():
            free = [layer for layer, end in enumerate(layer_ends) if end <= steps[index]]
            if free:
                layers[index] = free[0]
                layer_ends[free[0]] = int(ends[index])
            else:
                layers[index] = len(layer_ends)
                layer_ends.append(int(ends[index]))
    result = np.empty_like(layers)
    result[order] = layers
    return result
