"""Bars and positions inside bars, from a piece's real time-signature map, on the step grid."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class TimeSignatureChange:
    step: int
    numerator: int
    denominator: int


def ticks_to_steps(ticks: np.ndarray | int, steps_per_quarter: int, ticks_per_quarter: int) -> np.ndarray | int:
    """The nearest step to each tick (halves round up), in exact integer arithmetic."""
    return (2 * steps_per_quarter * ticks + ticks_per_quarter) // (2 * ticks_per_quarter)


def bar_steps_of(numerator: int, denominator: int, steps_per_quarter: int) -> int:
    """Length of one bar in steps (at least one step)."""
    return max(1, round(numerator * 4 * steps_per_quarter / denominator))


def signature_of_bar_steps(bar_steps: int, steps_per_quarter: int) -> tuple[int, int]:
    """The simplest time signature whose bar lasts `bar_steps` (6/8 and 3/4 both give 3/4)."""
    for denominator in (4, 8, 16, 32, 64):
        quarters_times_den = bar_steps * denominator
        if quarters_times_den % (4 * steps_per_quarter) == 0:
            return quarters_times_den // (4 * steps_per_quarter), denominator
    return bar_steps, 4 * steps_per_quarter


def normalise_changes(changes: list[TimeSignatureChange]) -> list[TimeSignatureChange]:
    """Changes sorted by step, 4/4 from step 0 unless given, the last one written at a step winning,
    and restatements of the current signature dropped (they do not start a new bar)."""
    last_at_step = {c.step: c for c in sorted(changes, key=lambda c: c.step)}
    if 0 not in last_at_step:
        last_at_step[0] = TimeSignatureChange(0, 4, 4)
    kept: list[TimeSignatureChange] = []
    for step in sorted(last_at_step):
        change = last_at_step[step]
        if not kept or (kept[-1].numerator, kept[-1].denominator) != (change.numerator, change.denominator):
            kept.append(change)
    return kept


class BarGrid:
    """Maps absolute steps to (bar index, position inside the bar).

    A time-signature change starts a new bar where it occurs, even if the previous bar is unfinished
    (which is how a change mid-bar sounds in a sequencer). Positions are bounded by `beat_positions`:
    in a bar longer than that they wrap around.
    """

    def __init__(self, changes: list[TimeSignatureChange], steps_per_quarter: int, beat_positions: int) -> None:
        self.changes = normalise_changes(changes)
        self.steps_per_quarter = steps_per_quarter
        self.beat_positions = beat_positions
        self.starts = np.array([c.step for c in self.changes], dtype=np.int64)
        self.bar_steps = np.array(
            [bar_steps_of(c.numerator, c.denominator, steps_per_quarter) for c in self.changes], dtype=np.int64
        )
        spans = np.diff(self.starts)
        bars_per_segment = -(-spans // self.bar_steps[:-1])  # an unfinished bar before a change still counts
        self.first_bars = np.concatenate(([0], np.cumsum(bars_per_segment))).astype(np.int64)
        self.wraps = bool(self.bar_steps.max() > beat_positions)  # some bar has more steps than positions

    @classmethod
    def default(cls, steps_per_quarter: int, beat_positions: int) -> BarGrid:
        return cls([], steps_per_quarter, beat_positions)

    @staticmethod
    @lru_cache(maxsize=1024)
    def of(changes: tuple[tuple[int, int, int], ...], steps_per_quarter: int, beat_positions: int) -> BarGrid:
        """The grid of (step, numerator, denominator) changes, shared between pieces with the same map
        (most files have one of a few maps, and a grid is never modified)."""
        return BarGrid([TimeSignatureChange(*change) for change in changes], steps_per_quarter, beat_positions)

    def locate(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bar index, position in bar) of each step."""
        steps = np.asarray(steps, dtype=np.int64)
        if self.starts.size == 1:
            bars, positions = np.divmod(steps, int(self.bar_steps[0]))
            return bars, positions % self.beat_positions if self.wraps else positions
        segment = np.searchsorted(self.starts, steps, side="right") - 1
        bars, positions = np.divmod(steps - self.starts[segment], self.bar_steps[segment])
        return self.first_bars[segment] + bars, positions % self.beat_positions if self.wraps else positions

    def bar_start(self, bar: int) -> int:
        """Step at which bar number `bar` begins."""
        segment = int(np.searchsorted(self.first_bars, bar, side="right") - 1)
        return int(self.starts[segment] + (bar - self.first_bars[segment]) * self.bar_steps[segment])

    @classmethod
    def from_positions(
        cls, steps: np.ndarray, bars: np.ndarray, beats: np.ndarray, steps_per_quarter: int, beat_positions: int
    ) -> BarGrid:
        """Rebuild the time-signature map implied by tokens' positions (used by `decode`).

        A bar starts at `step - beat` of its tokens (the earliest such step, since positions wrap in
        bars longer than the beat bound); consecutive known bar starts give the bar lengths, and each
        change of length becomes a time signature.
        """
        steps, bars, beats = (np.asarray(a, dtype=np.int64) for a in (steps, bars, beats))
        if steps.size == 0:
            return cls.default(steps_per_quarter, beat_positions)
        starts_by_bar: dict[int, int] = {}
        for bar, start in zip(bars.tolist(), (steps - beats).tolist()):
            starts_by_bar[bar] = min(start, starts_by_bar.get(bar, start))
        known = sorted(starts_by_bar.items())
        changes: list[TimeSignatureChange] = []
        current = None
        for (bar_a, start_a), (bar_b, start_b) in zip(known, known[1:]):
            span, count = start_b - start_a, bar_b - bar_a
            if span <= 0 or span % count:
                continue
            length = span // count
            if length != current:
                num, den = signature_of_bar_steps(length, steps_per_quarter)
                # the first signature is taken to hold from the start of the piece
                changes.append(TimeSignatureChange(start_a if changes else 0, num, den))
                current = length
        return cls(changes, steps_per_quarter, beat_positions)

    def time_signatures(self) -> list[TimeSignatureChange]:
        return list(self.changes)
