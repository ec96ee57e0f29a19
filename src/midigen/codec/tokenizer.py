"""The seed's encoding: MIDI → sparse score → position score → index score (tokens), and back.

Every token carries its absolute step, bar and position in the bar. The step of a token is the time
"at" that token: notes and their durations sit at their onset; `<sep>` sits where the gap starts and
the gap's duration token where it ends, so the model sees the new bar/beat before the next note.

What the encoding loses, all of it:
- timing finer than the grid: onsets and note ends are rounded to the nearest step (halves up), and
  a note lasts at least one step;
- length beyond `max_duration` steps (longer notes are clamped to it);
- of several notes with the same pitch and onset step (unisons between tracks included), all but
  the longest, unless `merge_unisons` is off;
- velocities, instruments and the track layout (all kept tracks become one stream, and `decode`
  writes one track at one velocity, plus a track for each further layer of same-pitch notes that
  overlap, which one MIDI track cannot hold), tempo changes (`decode` writes one tempo, the caller's),
  controllers, pedals, pitch bends, lyrics, markers and key signatures;
- drum tracks, unless `keep_drums` is set (then their notes become pitched notes like the others);
- time signatures are kept in the bar grid, at step resolution; a sequence that has lost its grid
  (as read back from a token store) rebuilds it from its positions, which hold only bar lengths:
  6/8 comes back as 3/4, and a change that no token falls after is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import symusic

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab
from midigen.codec.grammar import GrammarTables
from midigen.codec.midi_io import DRUM_INSTRUMENT, NoteTable, read_notes
from midigen.codec.multitrack import decode_multitrack, encode_multitrack, instrument_feature, multitrack_score
from midigen.codec.rows import (
    GAP,
    MAX_BATCH_SONGS,
    MAX_SONG_STEPS,
    ROW_SONG,
    PositionScore,
    grid_of,
    overlap_layers,
    position_rows,
    quantised_steps,
    song_of_each,
    sort_notes,
    split_long_gaps,
    ticks_per_quarter_of,
)
from midigen.codec.timing import BarGrid
from midigen.errors import BadMidiError, MidigenError

DEFAULT_VELOCITY = 80
MAX_DENSE_CELLS = 50_000_000


@dataclass
class SparseScore:
    """Notes on the step grid: (step, pitch) → duration, sorted by step, then highest pitch first."""

    steps: np.ndarray  # (N,) int64
    pitches: np.ndarray  # (N,) int64
    durations: np.ndarray  # (N,) int64, 1..max_duration
    grid: BarGrid
    merged_notes: int = 0  # notes dropped because a longer one had the same pitch and onset (merge_unisons)
    clamped_notes: int = 0  # notes shortened to max_duration

    def __len__(self) -> int:
        return int(self.steps.size)

    @property
    def num_steps(self) -> int:
        return int((self.steps + self.durations).max()) if len(self) else 0

    def to_dense(self) -> np.ndarray:
        """The (steps, 128) matrix the seed used: value = duration of the note starting there (of unisons
        kept apart, the longest), else 0."""
        cells = self.num_steps * NUM_PITCHES
        if cells > MAX_DENSE_CELLS:
            raise MidigenError(f"score too long for a dense matrix ({self.num_steps} steps)")
        dense = np.zeros((self.num_steps, NUM_PITCHES), dtype=np.int32)
        np.maximum.at(dense, (self.steps, self.pitches), self.durations)
        return dense

    def notes(self) -> set[tuple[int, int, int]]:
        """The notes as a set of (onset step, pitch, duration), for comparisons."""
        return set(zip(self.steps.tolist(), self.pitches.tolist(), self.durations.tolist()))


# The smallest dtypes that always hold a sequence's arrays (the config bounds token ids and positions in a bar to
# uint16, MAX_SONG_STEPS bounds steps and bars, instrument features fit a byte): how a token store keeps them, and
# the order in which `TokenSequence.pack` lays them out.
SINGLE_STREAM_DTYPES: dict[str, type[np.generic]] = {"tokens": np.uint16, "steps": np.uint32, "bars": np.uint32,
                                                     "beats": np.uint16}
MULTITRACK_DTYPES: dict[str, type[np.generic]] = SINGLE_STREAM_DTYPES | {"instruments": np.uint8}
INSTRUMENT_FEATURES = 130  # the `instruments` feature: 0 none, 1 + program, 129 drums


def array_dtypes_of(config: TokenizerConfig) -> dict[str, type[np.generic]]:
    """How a store keeps the token and feature arrays of an encoding with `config`'s instruments setting."""
    return MULTITRACK_DTYPES if config.instruments else SINGLE_STREAM_DTYPES


def feature_sizes_of(config: TokenizerConfig) -> dict[str, int | None]:
    """The features each token carries (name → number of values; None: unbounded, `bars`)."""
    sizes: dict[str, int | None] = {"bars": None, "beats": config.beat_positions}
    if config.instruments:
        sizes["instruments"] = INSTRUMENT_FEATURES
    return sizes


def pitch_lookups(pitches: np.ndarray) -> dict[str, np.ndarray]:
    """`pitch_classes` (1 + pitch class) and `octaves` (1 + pitch // 12) of each token's pitch (−1: none), 0 where
    there is none."""
    pitch = np.asarray(pitches, dtype=np.int64)
    pitched = pitch >= 0
    return {"pitch_classes": np.where(pitched, 1 + pitch % 12, 0), "octaves": np.where(pitched, 1 + pitch // 12, 0)}


def one_hot_counts(lookups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`token_value_counts` of tokens holding at most one note: each token's lookup value, one-hot (V, values)."""
    return {name: np.eye(int(values.max()) + 1, dtype=np.float32)[values] for name, values in lookups.items()}


def bytes_per_token(dtypes: dict[str, type[np.generic]]) -> int:
    return sum(np.dtype(dtype).itemsize for dtype in dtypes.values())


@dataclass
class TokenSequence:
    """The index score: token ids, each token's absolute step, and its named features (`bars`, its bar index;
    `beats`, its position in the bar; `instruments` with instruments on, see `INSTRUMENT_FEATURES`)."""

    tokens: np.ndarray  # (T,) int64
    steps: np.ndarray  # (T,) int64
    features: dict[str, np.ndarray]  # name → (T,) int64
    grid: BarGrid | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def bars(self) -> np.ndarray:
        return self.features["bars"]

    @property
    def beats(self) -> np.ndarray:
        return self.features["beats"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Tokens, steps and features by name."""
        return {"tokens": self.tokens, "steps": self.steps, **self.features}

    def pack(self, dtypes: dict[str, type[np.generic]]) -> bytes:
        """The arrays named in `dtypes`, in its order and types, one after the other, as one compact buffer."""
        arrays = self.arrays()
        return b"".join(arrays[name].astype(dtype).tobytes() for name, dtype in dtypes.items())

    @classmethod
    def unpacked(cls, arrays: dict[str, np.ndarray], grid: BarGrid | None = None) -> TokenSequence:
        columns = {name: np.asarray(array, dtype=np.int64) for name, array in arrays.items()}
        return cls(columns.pop("tokens"), columns.pop("steps"), columns, grid)

    def slice(self, window: slice) -> TokenSequence:
        """The tokens in `window`, with their steps and features."""
        return TokenSequence(self.tokens[window], self.steps[window],
                             {name: array[window] for name, array in self.features.items()}, self.grid)


@dataclass
class EncodedFile:
    """One file's tokens and what the encoding did to its notes."""

    sequence: TokenSequence
    notes: int  # notes read and kept (drums dropped are not counted), before merging
    merged: int  # notes dropped by the merge of unisons
    clamped: int  # notes shortened to max_duration
    instruments: tuple[int, ...]  # instrument keys present: programs, 128 for drums


def unpack(buffer: bytes, dtypes: dict[str, type[np.generic]]) -> dict[str, np.ndarray]:
    """The arrays of a `TokenSequence.pack` buffer, as read-only views in `dtypes`."""
    length, offset = len(buffer) // bytes_per_token(dtypes), 0
    arrays = {}
    for name, dtype in dtypes.items():
        arrays[name] = np.frombuffer(buffer, dtype=dtype, count=length, offset=offset)
        offset += length * np.dtype(dtype).itemsize
    return arrays


class SeedTokenizer:
    """`encode` MIDI into a `TokenSequence`; `decode` tokens back into a `symusic.Score`."""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()
        self.vocab: Vocab = self.config.vocab

    # ---- what the rest of midigen asks (`midigen.codec.interface.Tokenizer`) -------------------
    @property
    def pad_id(self) -> int:
        return Vocab.PAD

    @property
    def array_dtypes(self) -> dict[str, type[np.generic]]:
        return array_dtypes_of(self.config)

    @property
    def feature_sizes(self) -> dict[str, int | None]:
        return feature_sizes_of(self.config)

    @cached_property
    def grammar(self) -> GrammarTables:
        return GrammarTables(self.config)

    def sounding(self) -> np.ndarray:
        return self.vocab.family_of("note") | self.vocab.family_of("hit")

    def note_counts(self) -> np.ndarray:
        return self.sounding().astype(np.int64)

    def transposable_pitches(self) -> np.ndarray:
        return np.where(self.vocab.family_of("note"), self.vocab.values(), -1)

    def token_pitches(self) -> np.ndarray:
        return self.transposable_pitches()

    def token_lookups(self) -> dict[str, np.ndarray]:
        """`pitch_classes` (1 + pitch class) and `octaves` (1 + pitch // 12) of pitched notes; 0 for drum hits and
        every other token."""
        return pitch_lookups(self.transposable_pitches())

    def token_value_counts(self) -> dict[str, np.ndarray]:
        return one_hot_counts(self.token_lookups())

    def instrument_tokens(self, instruments: Sequence[int]) -> np.ndarray:
        """(V,) bool: every token but the instrument tokens of other programs, and drum hits unless 128 is chosen."""
        allowed = np.ones(self.vocab.size, dtype=bool)
        values = self.vocab.values()
        allowed[self.vocab.family_of("instrument") & ~np.isin(values, list(instruments))] = False
        if DRUM_INSTRUMENT not in instruments:
            allowed[self.vocab.family_of("hit")] = False
        return allowed

    def token_types(self) -> dict[str, np.ndarray]:
        types = {family: self.vocab.family_of(family) for family in self.vocab.families if family != "special"}
        types["sep"] = np.arange(self.vocab.size) == Vocab.SEP
        return types

    # ---- encode -------------------------------------------------------------------------------
    def encode(self, source: str | Path | bytes | symusic.Score | NoteTable) -> TokenSequence:
        """Encode a MIDI path, MIDI bytes, a symusic Score or extracted notes.

        Raises `BadMidiError` on unusable input.
        """
        notes = source if isinstance(source, NoteTable) else read_notes(source)
        return self.encode_files([notes])[0].sequence

    def encode_files(self, tables: Sequence[NoteTable]) -> list[EncodedFile]:
        """Encode several files together: one sort and a few array operations for all of them."""
        if self.config.instruments:
            songs = encode_multitrack(tables, self.config)
            return [EncodedFile(self.placed(song.tokens, song.steps, song.grid, song.instruments), song.notes,
                                song.merged_notes, song.clamped_notes, instruments_of(table, self.config.keep_drums))
                    for song, table in zip(songs, tables)]
        kept = [self.stream_notes(table) for table in tables]
        scores = self.sparse_scores(kept)
        return [EncodedFile(sequence, len(notes), score.merged_notes, score.clamped_notes,
                            instruments_of(notes, self.config.keep_drums))
                for notes, score, sequence in zip(kept, scores, self.index_scores(scores))]

    def stream_notes(self, notes: NoteTable) -> NoteTable:
        """The notes the single stream keeps: all, or all but the drums."""
        if self.config.keep_drums or not notes.drums.any():
            return notes
        kept = notes.select(~notes.drums)
        if len(kept) == 0:
            raise BadMidiError(notes.path, "only drum notes (drums are dropped)")
        return kept

    def sparse_score(self, source: str | Path | bytes | symusic.Score | NoteTable) -> SparseScore:
        """Quantise notes to the grid, sort them (step, highest pitch first, longest first) and, with
        `merge_unisons`, keep only the longest of the notes of one pitch starting on the same step."""
        notes = source if isinstance(source, NoteTable) else read_notes(source)
        return self.sparse_scores([self.stream_notes(notes)])[0]

    def sparse_scores(self, files: Sequence[NoteTable]) -> list[SparseScore]:
        """`sparse_score` of the notes of several files, sorted together: one sort and a few array
        operations for all of them, which costs far less per file than one call each.

        Raises `BadMidiError` naming the first file whose notes do not fit the grid.
        """
        if not files:
            return []
        if len(files) > MAX_BATCH_SONGS:
            raise MidigenError(f"at most {MAX_BATCH_SONGS} files at once, got {len(files)}")
        counts = [len(notes) for notes in files]
        songs = song_of_each(counts)
        onsets, durations, clamped = self._quantise(files, songs)
        steps, pitches, durations, merged = sort_notes(
            songs, onsets, np.concatenate([notes.pitches for notes in files]), durations, self.config.merge_unisons,
            len(files),
        )
        bounds = np.zeros(len(files) + 1, dtype=np.int64)
        np.cumsum(np.asarray(counts) - merged, out=bounds[1:])
        return [
            SparseScore(steps[start:end], pitches[start:end], durations[start:end], self.grid_of(notes),
                        merged_notes=merged_here, clamped_notes=clamped_here)
            for notes, merged_here, clamped_here, start, end
            in zip(files, merged.tolist(), clamped.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())
        ]

    def quantise(self, notes: NoteTable) -> tuple[np.ndarray, np.ndarray, int]:
        """Each note's onset step and duration in steps (1..max_duration), in input order, and how many
        notes were shortened to max_duration."""
        onsets, durations, clamped = self._quantise([notes], song_of_each([len(notes)]))
        return onsets, durations, int(clamped[0])

    def _quantise(self, files: Sequence[NoteTable], songs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`quantise` of the notes of several files (each note's file in `songs`), one after the other;
        notes clamped per file."""
        cfg = self.config
        onsets, lengths = quantised_steps(files, songs, cfg.steps_per_quarter)
        clamped = np.bincount(songs[lengths > cfg.max_duration], minlength=len(files))
        return onsets, np.minimum(np.maximum(lengths, 1), cfg.max_duration), clamped

    def grid_of(self, notes: NoteTable) -> BarGrid:
        """The bar grid of a piece's time-signature map, in steps."""
        return grid_of(notes, self.config)

    @staticmethod
    def position_score(sparse: SparseScore) -> PositionScore:
        """Sparse score → rows of (pitch, duration, step), with a gap row before each new onset group."""
        return PositionScore(position_rows(sparse.steps, sparse.pitches, sparse.durations), sparse.grid)

    def index_score(self, position: PositionScore) -> TokenSequence:
        """Position score → tokens: `<sos>`, an `n d` pair per note and a `<sep> d` pair per gap, `<eos>`.

        Each token's step comes from its row: a pair's first token sits at the row's step, a gap's
        duration token where the gap ends (what `token_steps` derives from the tokens alone).
        """
        tokens, steps, _ = self._token_arrays(position.rows, num_songs=1)
        return self.placed(tokens, steps, position.grid)

    def index_scores(self, scores: Sequence[SparseScore]) -> list[TokenSequence]:
        """`index_score(position_score(score))` of each sparse score, computed together (see `sparse_scores`)."""
        if not scores:
            return []
        songs = song_of_each([len(score) for score in scores])
        rows = position_rows(*(np.concatenate([getattr(score, name) for score in scores])
                               for name in ("steps", "pitches", "durations")), songs)
        tokens, steps, bounds = self._token_arrays(rows, num_songs=len(scores))
        sequences = []
        for score, start, end in zip(scores, bounds[:-1].tolist(), bounds[1:].tolist()):
            sequences.append(self.placed(tokens[start:end], steps[start:end], score.grid))
        return sequences

    def _token_arrays(self, rows: np.ndarray, num_songs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens and their steps for position rows of one song, or of several (their songs in column
        `ROW_SONG`, in order), and where each song's tokens begin, plus the end (num_songs + 1,)."""
        vocab, max_dur = self.vocab, self.config.max_duration
        if int(rows[:, PositionScore.DURATION].max(initial=0)) > max_dur:  # notes are clamped: only gaps are this long
            rows = split_long_gaps(rows, max_dur)
        pitch, length, step = rows[:, PositionScore.PITCH], rows[:, PositionScore.DURATION], rows[:, PositionScore.STEP]
        song = rows[:, ROW_SONG] if rows.shape[1] > ROW_SONG else np.zeros(pitch.size, dtype=np.int64)
        bounds = np.zeros(num_songs + 1, dtype=np.int64)
        np.cumsum(2 * np.bincount(song, minlength=num_songs) + 2, out=bounds[1:])  # <sos>, two per row, <eos>
        firsts, lasts = bounds[:-1], bounds[1:] - 1
        heads = 2 * np.arange(pitch.size) + 2 * song + 1  # each row's first token: songs before it add their <sos> <eos>
        is_gap = pitch == GAP
        tokens = np.empty(bounds[-1], dtype=np.int64)
        tokens[heads] = np.where(is_gap, Vocab.SEP, vocab.ids_of("note").start + pitch)
        tokens[heads + 1] = vocab.ids_of("duration").start - 1 + length
        tokens[firsts], tokens[lasts] = Vocab.SOS, Vocab.EOS
        steps = np.empty_like(tokens)
        steps[heads] = step
        steps[heads + 1] = step + length * is_gap
        steps[firsts] = 0
        steps[lasts] = steps[lasts - 1]  # after the <sos> assignment: a song without notes ends at step 0
        return tokens, steps, bounds

    # ---- positions ----------------------------------------------------------------------------
    def token_steps(self, tokens: np.ndarray, start_step: int = 0, after_sep: bool = False) -> np.ndarray:
        """Absolute step of each token, derived from the tokens alone.

        `after_sep` says whether the token before `tokens[0]` was a `<sep>` (for incremental use).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        durations = self.vocab.ids_of("duration")
        length = np.where((tokens >= durations.start) & (tokens < durations.stop), tokens - (durations.start - 1), 0)
        follows_sep = np.empty(tokens.size, dtype=bool)
        follows_sep[:1] = after_sep
        np.equal(tokens[:-1], Vocab.SEP, out=follows_sep[1:])
        follows_sep &= length >= 1  # only a duration after a <sep> moves time on
        steps = np.cumsum(length * follows_sep)
        return steps + start_step if start_step else steps

    def with_positions(self, tokens: np.ndarray, grid: BarGrid) -> TokenSequence:
        """Tokens with the steps `token_steps` derives from them, placed in `grid`."""
        return self.placed(tokens, self.token_steps(tokens), grid)

    def placed(self, tokens: np.ndarray, steps: np.ndarray, grid: BarGrid,
               instruments: np.ndarray | None = None) -> TokenSequence:
        """Tokens at `steps`, with the features they carry in `grid` (`instruments` derived from the tokens
        unless given)."""
        bars, beats = grid.locate(steps)
        features = {"bars": bars, "beats": beats}
        if self.config.instruments:
            features["instruments"] = instrument_feature(tokens, self.config) if instruments is None else instruments
        return TokenSequence(tokens, steps, features, grid)

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
        notes, durations = vocab.ids_of("note"), vocab.ids_of("duration")
        head_ok = (heads == Vocab.SEP) | ((heads >= notes.start) & (heads < notes.stop))
        tail_ok = (tails >= durations.start) & (tails < durations.stop)
        if not (head_ok.all() and tail_ok.all()):
            where = int(np.flatnonzero(~(head_ok & tail_ok))[0])
            names = vocab.describe(pairs[where])
            raise MidigenError(f"invalid token pair {names} at pair {where}: expected a note or <sep>, then a duration")
        lengths = tails - durations.start + 1
        is_sep = heads == Vocab.SEP
        time = np.cumsum(np.where(is_sep, lengths, 0))
        is_note = ~is_sep
        one_song = np.zeros(int(np.count_nonzero(is_note)), dtype=np.int64)
        steps, pitches, durations, merged = sort_notes(one_song, time[is_note], heads[is_note] - notes.start,
                                                       lengths[is_note], self.config.merge_unisons, num_songs=1)
        cfg = self.config
        grid = grid or BarGrid.default(cfg.steps_per_quarter, cfg.beat_positions)
        return SparseScore(steps, pitches, durations, grid, merged_notes=int(merged[0]))

    def decode(self, sequence: TokenSequence | np.ndarray | list[int], tempos: Sequence[tuple[int, float]] = (),
               grid: BarGrid | None = None) -> symusic.Score:
        """Tokens → a `symusic.Score`: one piano track for the single stream, else a track per instrument.

        `tempos` are (step, quarter notes per minute), the config's tempo if empty. Time signatures come from
        `grid` if given, else from a `TokenSequence`'s own grid, else from its positions
        (`BarGrid.from_positions`); plain token ids get 4/4.
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
        grid = grid or BarGrid.default(cfg.steps_per_quarter, cfg.beat_positions)
        tempos = list(tempos) or [(0, cfg.tempo_qpm)]
        if cfg.instruments:
            return multitrack_score(decode_multitrack(tokens, cfg), grid, tempos, cfg)
        return self.to_score(self.decode_sparse(tokens, grid), tempos)

    def to_score(self, sparse: SparseScore, tempos: Sequence[tuple[int, float]]) -> symusic.Score:
        """A sparse score as a piano `symusic.Score` in ticks: one track, plus one more for each further layer of
        notes that start while a note of the same pitch still sounds (see `overlap_layers`)."""
        tpq = ticks_per_quarter_of(self.config)
        ticks_per_step = tpq // self.config.steps_per_quarter
        score = symusic.Score(tpq)
        for step, qpm in tempos:
            score.tempos.append(symusic.Tempo(step * ticks_per_step, qpm))
        for change in sparse.grid.time_signatures():
            score.time_signatures.append(
                symusic.TimeSignature(change.step * ticks_per_step, change.numerator, change.denominator)
            )
        layers = overlap_layers(sparse.pitches, sparse.steps, sparse.durations)
        for layer in range(int(layers.max(initial=0)) + 1):
            track = symusic.Track("piano" if layer == 0 else f"piano (overlapping notes {layer})", program=0,
                                  is_drum=False)
            notes = layers == layer
            track.notes = symusic.Note.from_numpy(
                time=(sparse.steps[notes] * ticks_per_step).astype(np.int32),
                duration=(sparse.durations[notes] * ticks_per_step).astype(np.int32),
                pitch=sparse.pitches[notes].astype(np.int8),
                velocity=np.full(int(notes.sum()), DEFAULT_VELOCITY, dtype=np.int8),
            )
            score.tracks.append(track)
        return score


def instruments_of(notes: NoteTable, keep_drums: bool) -> tuple[int, ...]:
    """The instrument keys a file's kept notes play (programs; `DRUM_INSTRUMENT` for drums)."""
    keys = np.unique(notes.instruments)
    return tuple(int(key) for key in keys if keep_drums or key != DRUM_INSTRUMENT)


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
    names = [pitch_name(int(p)) for p in pitches]
    width = 1 + max(len(str(int(sparse.durations.max()))), *(len(name) for name in names))
    header = "step  bar:beat " + "".join(f"{name:>{width}}" for name in names)
    lines = [header]
    bars, beats = sparse.grid.locate(np.arange(first_step, first_step + num_steps))
    for offset in range(num_steps):
        step = first_step + offset
        cells = ["."] * len(pitches)
        for i in np.flatnonzero(window & (sparse.steps == step))[::-1]:  # of unisons kept apart, the longest shows
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
