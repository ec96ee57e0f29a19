"""The seed's encoding: MIDI → sparse score → position score → index score (tokens), and back.

Every token carries its absolute step, bar and position in the bar. The step of a token is the time
"at" that token: notes and their durations sit at their onset; `<sep>` sits where the gap starts and
the gap's duration token where it ends, so the model sees the new bar/beat before the next note.

What the encoding loses, all of it:
- timing finer than the grid (onsets and note ends are rounded to the nearest step; a note lasts
  at least one step),
- notes longer than `max_duration` steps (clamped to `max_duration`),
- velocities, instruments, tempo changes, controllers, pitch bends (`decode` writes one piano
  track at one tempo and velocity),
- of two notes with the same pitch and the same onset step, the shorter one,
- drum tracks, unless `keep_drums` is set,
- the difference between time signatures with the same bar length (6/8 decodes as 3/4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import symusic

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab
from midigen.codec.midi_io import MidiNotes, first_tempo, read_notes
from midigen.codec.timing import BarGrid, TimeSignatureChange
from midigen.errors import BadMidiError, MidigenError

GAP = -1  # pitch column value of a gap row in a position score
DEFAULT_VELOCITY = 80
MAX_SONG_STEPS = 2**24  # about 24 days at 120 qpm and 8 steps per quarter; steps are stored as uint32
MAX_DENSE_CELLS = 50_000_000


@dataclass
class SparseScore:
    """Notes on the step grid: (step, pitch) → duration, sorted by step, then highest pitch first."""

    steps: np.ndarray  # (N,) int64
    pitches: np.ndarray  # (N,) int64
    durations: np.ndarray  # (N,) int64, 1..max_duration
    grid: BarGrid
    merged_notes: int = 0  # notes dropped because another note had the same pitch and onset
    clamped_notes: int = 0  # notes shortened to max_duration

    def __len__(self) -> int:
        return int(self.steps.size)

    @property
    def num_steps(self) -> int:
        return int((self.steps + self.durations).max()) if len(self) else 0

    def to_dense(self) -> np.ndarray:
        """The (steps, 128) matrix the seed used: value = duration of the note starting there, else 0."""
        cells = self.num_steps * NUM_PITCHES
        if cells > MAX_DENSE_CELLS:
            raise MidigenError(f"score too long for a dense matrix ({self.num_steps} steps)")
        dense = np.zeros((self.num_steps, NUM_PITCHES), dtype=np.int32)
        dense[self.steps, self.pitches] = self.durations
        return dense

    def notes(self) -> set[tuple[int, int, int]]:
        """The notes as a set of (onset step, pitch, duration), for comparisons."""
        return set(zip(self.steps.tolist(), self.pitches.tolist(), self.durations.tolist()))


@dataclass
class PositionScore:
    """Rows of (pitch, duration, step); a gap row (pitch = GAP, duration = gap) precedes each new onset group."""

    rows: np.ndarray  # (R, 3) int64
    grid: BarGrid

    PITCH, DURATION, STEP = 0, 1, 2


@dataclass
class TokenSequence:
    """The index score: token ids and, for each token, its absolute step, bar and position in the bar."""

    tokens: np.ndarray  # (T,) int64
    steps: np.ndarray  # (T,) int64
    bars: np.ndarray  # (T,) int64
    beats: np.ndarray  # (T,) int64
    grid: BarGrid | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.tokens.size)


class SeedTokenizer:
    """`encode` MIDI into a `TokenSequence`; `decode` tokens back into a `symusic.Score`."""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()
        self.vocab: Vocab = self.config.vocab

    # ---- encode -------------------------------------------------------------------------------
    def encode(self, source: str | Path | bytes | symusic.Score | MidiNotes) -> TokenSequence:
        """Encode a MIDI path, MIDI bytes, a symusic Score or extracted notes.

        Raises `BadMidiError` on unusable input.
        """
        return self.index_score(self.position_score(self.sparse_score(source)))

    def sparse_score(self, source: str | Path | bytes | symusic.Score | MidiNotes) -> SparseScore:
        notes = source if isinstance(source, MidiNotes) else read_notes(source, self.config.keep_drums)
        cfg = self.config
        scale = cfg.steps_per_quarter / notes.ticks_per_quarter
        onsets = np.floor(notes.onsets * scale + 0.5).astype(np.int64)
        ends = np.floor((notes.onsets + notes.durations) * scale + 0.5).astype(np.int64)
        durations = np.maximum(ends - onsets, 1)
        clamped = int(np.count_nonzero(durations > cfg.max_duration))
        durations = np.minimum(durations, cfg.max_duration)
        # step ascending, pitch descending, duration descending: the first of equal (step, pitch) is the longest
        order = np.lexsort((-durations, -notes.pitches, onsets))
        onsets, pitches, durations = onsets[order], notes.pitches[order], durations[order]
        if onsets.size and (onsets.min() < 0 or int((onsets + durations).max()) > MAX_SONG_STEPS):
            raise BadMidiError(None, f"timing out of range (notes beyond step {MAX_SONG_STEPS} or before 0)")
        keep = np.ones(onsets.size, dtype=bool)
        keep[1:] = (onsets[1:] != onsets[:-1]) | (pitches[1:] != pitches[:-1])
        grid = BarGrid(
            [
                TimeSignatureChange(int(np.floor(tick * scale + 0.5)), num, den)
                for tick, num, den in notes.time_signatures
            ],
            cfg.steps_per_quarter,
            cfg.beat_positions,
        )
        return SparseScore(
            steps=onsets[keep],
            pitches=pitches[keep],
            durations=durations[keep],
            grid=grid,
            merged_notes=int(keep.size - np.count_nonzero(keep)),
            clamped_notes=clamped,
        )

    @staticmethod
    def position_score(sparse: SparseScore) -> PositionScore:
        steps = sparse.steps
        if steps.size == 0:
            return PositionScore(np.zeros((0, 3), dtype=np.int64), sparse.grid)
        group_start = np.ones(steps.size, dtype=bool)
        group_start[1:] = steps[1:] != steps[:-1]
        group_steps = steps[group_start]
        previous = np.concatenate(([0], group_steps[:-1]))
        gaps = group_steps - previous
        has_gap = gaps > 0  # only the first group, at step 0, has none
        group_of_note = np.cumsum(group_start) - 1
        # each note row lands after its group's gap row (if any) and after all earlier groups' rows
        gap_rows_before = np.cumsum(has_gap)[group_of_note]
        note_pos = np.arange(steps.size) + gap_rows_before
        first_note_of_group = np.flatnonzero(group_start)
        gap_pos = note_pos[first_note_of_group[has_gap]] - 1
        rows = np.empty((steps.size + int(has_gap.sum()), 3), dtype=np.int64)
        rows[note_pos] = np.stack([sparse.pitches, sparse.durations, steps], axis=1)
        rows[gap_pos] = np.stack([np.full(int(has_gap.sum()), GAP), gaps[has_gap], previous[has_gap]], axis=1)
        return PositionScore(rows, sparse.grid)

    def index_score(self, position: PositionScore) -> TokenSequence:
        vocab, max_dur = self.vocab, self.config.max_duration
        pitch, length = position.rows[:, PositionScore.PITCH], position.rows[:, PositionScore.DURATION]
        is_gap = pitch == GAP
        # a gap longer than max_duration becomes several <sep> d pairs: full ones, then the rest
        pairs_per_row = np.where(is_gap, -(-length // max_dur), 1)
        row_of_pair = np.repeat(np.arange(pitch.size), pairs_per_row)
        first_pair = np.cumsum(pairs_per_row) - pairs_per_row
        index_in_row = np.arange(row_of_pair.size) - first_pair[row_of_pair]
        pair_is_gap = is_gap[row_of_pair]
        pair_len = np.where(pair_is_gap, np.minimum(max_dur, length[row_of_pair] - index_in_row * max_dur), length[row_of_pair])
        first = np.where(pair_is_gap, Vocab.SEP, vocab.note_offset + pitch[row_of_pair])
        second = vocab.duration_offset + pair_len - 1
        body = np.stack([first, second], axis=1).reshape(-1)
        tokens = np.concatenate(([Vocab.SOS], body, [Vocab.EOS])).astype(np.int64)
        return self.with_positions(tokens, position.grid)

    # ---- positions ----------------------------------------------------------------------------
    def token_steps(self, tokens: np.ndarray, start_step: int = 0, after_sep: bool = False) -> np.ndarray:
        """Absolute step of each token, derived from the tokens alone.

        `after_sep` says whether the token before `tokens[0]` was a `<sep>` (for incremental use).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        previous_is_sep = np.empty(tokens.size, dtype=bool)
        if tokens.size:
            previous_is_sep[0] = after_sep
            previous_is_sep[1:] = tokens[:-1] == Vocab.SEP
        is_duration = (tokens >= self.vocab.duration_offset) & (tokens < self.vocab.size)
        advance = np.where(previous_is_sep & is_duration, tokens - self.vocab.duration_offset + 1, 0)
        return start_step + np.cumsum(advance)

    def with_positions(self, tokens: np.ndarray, grid: BarGrid) -> TokenSequence:
        steps = self.token_steps(tokens)
        bars, beats = grid.locate(steps)
        return TokenSequence(tokens, steps, bars, beats, grid)

    # ---- decode -------------------------------------------------------------------------------
    def decode_sparse(self, tokens: np.ndarray, grid: BarGrid | None = None) -> SparseScore:
        """Tokens → sparse score. Specials are skipped; an unfinished final pair is dropped."""
        vocab = self.vocab
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and ((tokens < 0) | (tokens >= vocab.size)).any():
            bad = int(tokens[(tokens < 0) | (tokens >= vocab.size)][0])
            raise MidigenError(f"token id {bad} is outside the vocabulary (size {vocab.size})")
        body = tokens[(tokens != Vocab.PAD) & (tokens != Vocab.SOS) & (tokens != Vocab.EOS)]
        if body.size % 2:
            body = body[:-1]
        pairs = body.reshape(-1, 2)
        heads, tails = pairs[:, 0], pairs[:, 1]
        head_ok = (heads == Vocab.SEP) | ((heads >= vocab.note_offset) & (heads < vocab.duration_offset))
        tail_ok = tails >= vocab.duration_offset
        if not (head_ok.all() and tail_ok.all()):
            where = int(np.flatnonzero(~(head_ok & tail_ok))[0])
            names = vocab.describe(pairs[where])
            raise MidigenError(f"invalid token pair {names} at pair {where}: expected a note or <sep>, then a duration")
        lengths = tails - vocab.duration_offset + 1
        is_sep = heads == Vocab.SEP
        time = np.cumsum(np.where(is_sep, lengths, 0))
        is_note = ~is_sep
        steps, pitches, durations = time[is_note], heads[is_note] - vocab.note_offset, lengths[is_note]
        order = np.lexsort((-durations, -pitches, steps))
        cfg = self.config
        return SparseScore(
            steps[order], pitches[order], durations[order], grid or BarGrid.default(cfg.steps_per_quarter, cfg.beat_positions)
        )

    def decode(
        self,
        sequence: TokenSequence | np.ndarray | list[int],
        tempo_qpm: float | None = None,
        grid: BarGrid | None = None,
    ) -> symusic.Score:
        """Tokens → a one-track piano `symusic.Score`.

        Time signatures come from `grid` if given, else from the positions a `TokenSequence` carries,
        else 4/4.
        """
        cfg = self.config
        if isinstance(sequence, TokenSequence):
            tokens = sequence.tokens
            if grid is None:
                grid = sequence.grid or BarGrid.from_positions(
                    sequence.steps, sequence.bars, sequence.beats, cfg.steps_per_quarter, cfg.beat_positions
                )
        else:
            tokens = np.asarray(sequence, dtype=np.int64)
        sparse = self.decode_sparse(tokens, grid)
        return self.to_score(sparse, tempo_qpm or cfg.tempo_qpm)

    def to_score(self, sparse: SparseScore, tempo_qpm: float) -> symusic.Score:
        """A sparse score as a one-track piano `symusic.Score` in ticks."""
        spq = self.config.steps_per_quarter
        tpq = 480 if 480 % spq == 0 else spq * 60
        ticks_per_step = tpq // spq
        score = symusic.Score(tpq)
        score.tempos.append(symusic.Tempo(0, tempo_qpm))
        for change in sparse.grid.time_signatures():
            score.time_signatures.append(
                symusic.TimeSignature(change.step * ticks_per_step, change.numerator, change.denominator)
            )
        track = symusic.Track("piano", program=0, is_drum=False)
        track.notes = symusic.Note.from_numpy(
            time=(sparse.steps * ticks_per_step).astype(np.int32),
            duration=(sparse.durations * ticks_per_step).astype(np.int32),
            pitch=sparse.pitches.astype(np.int8),
            velocity=np.full(len(sparse), DEFAULT_VELOCITY, dtype=np.int8),
        )
        score.tracks.append(track)
        return score

    def tempo_of(self, source: str | Path | bytes | symusic.Score) -> float:
        return first_tempo(read_notes(source, keep_drums=True), self.config.tempo_qpm)


# ---- inspection ---------------------------------------------------------------------------------
def pitch_name(pitch: int) -> str:
    names = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
    return f"{names[pitch % 12]}{pitch // 12 - 1}"


def show_sparse_score(sparse: SparseScore, first_step: int = 0, num_steps: int = 32) -> str:
    """The sparse score as a text grid: one line per step, one column per pitch in use, cells = durations."""
    if len(sparse) == 0:
        return "(empty score)"
    window = (sparse.steps >= first_step) & (sparse.steps < first_step + num_steps)
    pitches = np.unique(sparse.pitches[window])[::-1] if window.any() else np.unique(sparse.pitches)[::-1]
    column = {int(p): i for i, p in enumerate(pitches)}
    width = max(4, max(len(str(int(d))) for d in sparse.durations) + 1)
    header = "step  bar:beat " + "".join(f"{pitch_name(int(p)):>{width}}" for p in pitches)
    lines = [header]
    bars, beats = sparse.grid.locate(np.arange(first_step, first_step + num_steps))
    for offset in range(num_steps):
        step = first_step + offset
        cells = ["."] * len(pitches)
        for i in np.flatnonzero(window & (sparse.steps == step)):
            cells[column[int(sparse.pitches[i])]] = str(int(sparse.durations[i]))
        lines.append(f"{step:>4}  {bars[offset]:>3}:{beats[offset]:<4} " + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def show_position_score(position: PositionScore, max_rows: int = 40) -> str:
    """The position score as a table: one row per note or gap, with its bar and beat."""
    lines = ["row   step  bar:beat  pitch  duration"]
    rows = position.rows[:max_rows]
    bars, beats = position.grid.locate(rows[:, PositionScore.STEP]) if rows.size else (np.zeros(0), np.zeros(0))
    for i, (pitch, duration, step) in enumerate(rows.tolist()):
        label = "gap" if pitch == GAP else f"{pitch_name(pitch)}({pitch})"
        lines.append(f"{i:>3}  {step:>5}  {bars[i]:>3}:{beats[i]:<4}  {label:>8}  {duration:>5}")
    if position.rows.shape[0] > max_rows:
        lines.append(f"... {position.rows.shape[0] - max_rows} more rows")
    return "\n".join(lines)


def note_accuracy(expected: set[tuple[int, int, int]], actual: set[tuple[int, int, int]]) -> float:
    """Share of expected (onset step, pitch, duration) notes found identical in `actual`."""
    return len(expected & actual) / len(expected) if expected else 1.0


__all__ = [
    "GAP",
    "PositionScore",
    "SeedTokenizer",
    "SparseScore",
    "TokenSequence",
    "note_accuracy",
    "pitch_name",
    "show_position_score",
    "show_sparse_score",
]
