"""A piece as evaluation sees it: the notes of its non-drum tracks in ticks, and its bars and beats.

Bars follow the file's time-signature map (`midigen.codec.timing.BarGrid`, in ticks); the piece spans
whole bars, from tick 0 to the end of the bar in which the last note ends. A beat is one quarter note,
counted from each bar start and cut short at the bar's end (a 3/8 bar has beats of 1 and ½ quarter),
so that 6/8 and 3/4, which the codec does not tell apart, measure alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import symusic

from midigen.codec.instruments import gm_name
from midigen.codec.midi_io import CONTINUATION_MARKER, extract_notes, load_score
from midigen.codec.timing import BarGrid, TimeSignatureChange
from midigen.errors import BadMidiError


@dataclass(frozen=True)
class Piece:
    name: str
    ticks_per_quarter: int
    onsets: np.ndarray  # (N,) int64 ticks, sorted by onset, then pitch
    durations: np.ndarray  # (N,) int64 ticks, at least 1 (a note lasts at least one tick)
    pitches: np.ndarray  # (N,) int64 0..127
    velocities: np.ndarray  # (N,) int64 0..127
    parts: np.ndarray  # (N,) int64 index into part_names: each note's instrument, or its track where all share one
    part_names: list[str]
    bar_starts: np.ndarray  # (B+1,) int64 ticks: the start of each bar, then the end of the last one
    continuation_tick: int | None  # where `midigen generate` marked the continuation's start
    drum_notes: int  # notes of drum tracks, left out

    @property
    def ends(self) -> np.ndarray:
        return self.onsets + self.durations

    @property
    def num_bars(self) -> int:
        return int(self.bar_starts.size - 1)

    def bar_of(self, ticks: np.ndarray) -> np.ndarray:
        """Index (into `bar_starts`) of the bar holding each tick."""
        return np.searchsorted(self.bar_starts, ticks, side="right") - 1

    def beat_starts(self) -> np.ndarray:
        """(K+1,) ticks: the start of each beat, then the end of the last bar."""
        bars = zip(self.bar_starts, self.bar_starts[1:])
        beats = [np.arange(start, end, self.ticks_per_quarter) for start, end in bars]
        return np.concatenate([*beats, self.bar_starts[-1:]]).astype(np.int64)

    def continuation(self) -> Piece:
        """The notes starting at or after the continuation marker, in the bars from the marker's bar on."""
        if self.continuation_tick is None:
            raise BadMidiError(self.name, "no continuation marker (not written by `midigen generate`)")
        kept = self.onsets >= self.continuation_tick
        if not kept.any():
            raise BadMidiError(self.name, "no notes after the continuation marker")
        first_bar = int(self.bar_of(np.array([self.continuation_tick]))[0])
        return replace(
            self,
            onsets=self.onsets[kept],
            durations=self.durations[kept],
            pitches=self.pitches[kept],
            velocities=self.velocities[kept],
            parts=self.parts[kept],
            bar_starts=self.bar_starts[first_bar:],
        )


def load_piece(source: str | Path | bytes | symusic.Score) -> Piece:
    """Read a MIDI file (or bytes, or a Score); a `BadMidiError` if it has no notes outside drum tracks."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "score"
    score = load_score(source)
    table = extract_notes(score, name)  # the one note reader (`midigen.codec.midi_io`)
    melodic = table.select(~table.drums)
    drum_notes = len(table) - len(melodic)
    if len(melodic) == 0:
        raise BadMidiError(name, "only drum notes (drums are left out)")
    if len(np.unique(melodic.programs)) > 1:  # instruments: a part per General MIDI program
        programs, parts = np.unique(melodic.programs, return_inverse=True)
        part_names = [gm_name(int(program)) for program in programs]
    else:  # one instrument (voices of a chorale, a piano's hands): a part per track
        kept_tracks, parts = np.unique(melodic.tracks, return_inverse=True)
        part_names = [table.track_names[track].strip() or f"track {track + 1}" for track in kept_tracks.tolist()]
    order = np.lexsort((melodic.pitches, melodic.onsets))
    durations = np.maximum(melodic.durations, 1)
    return Piece(
        name=name,
        ticks_per_quarter=table.ticks_per_quarter,
        onsets=melodic.onsets[order],
        durations=durations[order],
        pitches=melodic.pitches[order],
        velocities=melodic.velocities[order],
        parts=parts[order],
        part_names=part_names,
        bar_starts=bar_starts_until(score, int((melodic.onsets + durations).max())),
        continuation_tick=continuation_tick(score),
        drum_notes=drum_notes,
    )


def bar_grid(score: symusic.Score) -> BarGrid:
    """The score's bars in ticks (one step = one tick; positions inside bars are not used)."""
    changes = [
        TimeSignatureChange(int(ts.time), int(ts.numerator), int(ts.denominator))
        for ts in score.time_signatures
        if ts.numerator > 0 and ts.denominator > 0
    ]
    tpq = int(score.ticks_per_quarter)
    return BarGrid(changes, steps_per_quarter=tpq, beat_positions=tpq)


def bar_starts_until(score: symusic.Score, end_tick: int) -> np.ndarray:
    """(B+1,) bar starts in ticks for the bars up to the one holding tick `end_tick - 1`, then its end."""
    grid = bar_grid(score)
    last_bar = int(grid.locate(np.array([end_tick - 1]))[0][0])
    return np.array([grid.bar_start(bar) for bar in range(last_bar + 2)], dtype=np.int64)


def continuation_tick(score: symusic.Score) -> int | None:
    ticks = [int(marker.time) for marker in score.markers if marker.text == CONTINUATION_MARKER]
    return min(ticks) if ticks else None
