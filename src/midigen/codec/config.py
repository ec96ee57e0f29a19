"""`TokenizerConfig` and the vocabulary layout it implies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from midigen.config import JsonConfig
from midigen.errors import MidigenError

NUM_PITCHES = 128


@dataclass(frozen=True)
class TokenizerConfig(JsonConfig):
    """How MIDI becomes tokens.

    steps_per_quarter: grid resolution (8 = 32nd notes).
    max_duration: longest note or gap one duration token holds, in steps; longer notes are clamped,
        longer gaps are split into several `<sep> d` pairs.
    max_bar_quarters: bound on the position-in-bar embedding, in quarter notes: positions lie in
        [0, max_bar_quarters * steps_per_quarter); in longer bars (rare, e.g. 9/4) they wrap around.
    keep_drums: drum tracks (MIDI channel 10) are dropped unless this is set.
    tempo_qpm: tempo written by `decode` when the caller gives none.
    merge_unisons: notes of one pitch that start on the same step (most often voices or tracks in
        unison) become one note, the longest, as in the seed's sparse score, which holds one note per
        step and pitch; a single instrument sounds the same. Off, every one is kept: they follow each
        other in their onset group, longest first, and `decode` writes each further one on an extra track.
    """

    steps_per_quarter: int = 8
    max_duration: int = 256
    max_bar_quarters: int = 8
    keep_drums: bool = False
    tempo_qpm: float = 120.0
    merge_unisons: bool = True

    def __post_init__(self) -> None:
        if self.steps_per_quarter < 1:
            raise MidigenError(f"steps_per_quarter must be >= 1, got {self.steps_per_quarter}")
        if self.max_duration < 1:
            raise MidigenError(f"max_duration must be >= 1, got {self.max_duration}")
        if not self.tempo_qpm > 0:
            raise MidigenError(f"tempo_qpm must be > 0, got {self.tempo_qpm}")
        if self.max_bar_quarters < 1:
            raise MidigenError(f"max_bar_quarters must be >= 1, got {self.max_bar_quarters}")
        if Vocab(self).size > 2**16:
            raise MidigenError("vocabulary does not fit in uint16: lower max_duration")
        if self.beat_positions > 2**16:
            raise MidigenError("positions in a bar do not fit in uint16: lower max_bar_quarters or steps_per_quarter")

    @property
    def beat_positions(self) -> int:
        """Number of distinct positions inside a bar (the size of the beat embedding)."""
        return self.max_bar_quarters * self.steps_per_quarter

    @cached_property
    def vocab(self) -> Vocab:
        return Vocab(self)


class Vocab:
    """Token ids: `<pad> <sos> <eos> <sep>`, then `n0..n127`, then `d1..d<max_duration>`.

    Every offset between token families is computed here and nowhere else.
    """

    PAD, SOS, EOS, SEP = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<sos>", "<eos>", "<sep>")

    def __init__(self, config: TokenizerConfig) -> None:
        self.note_offset = len(self.SPECIALS)
        self.duration_offset = self.note_offset + NUM_PITCHES
        self.max_duration = config.max_duration
        self.size = self.duration_offset + config.max_duration
        assert self.note_offset == self.SEP + 1
        assert self.duration_offset - self.note_offset == NUM_PITCHES

    def note(self, pitch: int) -> int:
        assert 0 <= pitch < NUM_PITCHES
        return self.note_offset + pitch

    def duration(self, steps: int) -> int:
        assert 1 <= steps <= self.max_duration
        return self.duration_offset + steps - 1

    def is_note(self, token: int) -> bool:
        return self.note_offset <= token < self.duration_offset

    def is_duration(self, token: int) -> bool:
        return self.duration_offset <= token < self.size

    def names(self) -> list[str]:
        """Human-readable name of every token id, in id order."""
        return (
            list(self.SPECIALS)
            + [f"n{p}" for p in range(NUM_PITCHES)]
            + [f"d{d}" for d in range(1, self.max_duration + 1)]
        )

    def describe(self, tokens: Iterable[int] | np.ndarray) -> list[str]:
        names = self.names()
        return [names[int(t)] for t in tokens]
