"""The multi-track seed codec: notes with their instruments (General MIDI programs, drums) and velocities
as one token stream, and back. Arrays in, arrays out, vectorised over many songs at once.

Grammar of one song:
    <sos> ( [<sep> d<gap>]... group )... <eos>
    group = ( i<program> ( n<pitch> [v<bin>] d<duration> )... )...   pitched instruments, ascending program
            ( h<pitch> [v<bin>] )...                                 drum hits, highest pitch first
A group holds the notes starting on one step; a `<sep> d` gap (split into `max_duration` pieces when longer)
moves time on to the next group's step, as in the single-stream codec. A `v` token follows a note or hit
whose velocity bin differs from the last bin written for its instrument (drums are one instrument); the
first note of each instrument always has one. Without velocity bins there are no `v` tokens. (After the
pitch, so a velocity never stands where no note may follow: see `midigen.codec.grammar`.)

Each token's step: `<sos>` at 0, a group's tokens at its step, a gap's `<sep>` where the gap starts and its
duration where it ends, `<eos>` at the step of the token before it. Each token's `instruments` feature: 0 for
specials and gaps, 1 + program for an instrument token and the tokens of its notes, `DRUM_FEATURE` for hits
and their velocities.

What the encoding loses, beyond the single-stream codec's grid rounding and duration clamping: the track
layout (tracks with the same program become one instrument; drums one kit), drum durations (a hit lasts one
step when decoded), velocity within its bin, and of notes of one step, pitch and instrument all but the
longest (with `merge_unisons`; drum hits of one step and pitch always merge into the loudest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import symusic

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab
from midigen.codec.instruments import gm_name
from midigen.codec.midi_io import DRUM_INSTRUMENT, NoteTable
from midigen.codec.rows import (
    GAP,
    grid_of,
    overlap_layers,
    position_rows,
    quantised_steps,
    song_of_each,
    split_long_gaps,
    ticks_per_quarter_of,
)
from midigen.codec.timing import BarGrid
from midigen.errors import BadMidiError, MidigenError

DEFAULT_VELOCITY = 80
DRUM_FEATURE = DRUM_INSTRUMENT + 1  # the `instruments` feature of drum hits: 0 none, 1 + program, 129 drums
INSTRUMENT_KEYS = DRUM_INSTRUMENT + 1
ROW_NOTE, ROW_DURATION, ROW_STEP, ROW_SONG = 0, 1, 2, 3  # position rows; the pitch column holds the note index

# token families, as codes in `family_codes`
SPECIAL, NOTE, DURATION, INSTRUMENT, HIT, VELOCITY = range(6)
FAMILY_CODES = {"special": SPECIAL, "note": NOTE, "duration": DURATION, "instrument": INSTRUMENT, "hit": HIT,
                "velocity": VELOCITY}


@dataclass
class MultitrackSong:
    tokens: np.ndarray  # (T,) int64
    steps: np.ndarray  # (T,) int64
    instruments: np.ndarray  # (T,) int64: 0 none, 1 + program, DRUM_FEATURE for drum hits
    grid: BarGrid
    notes: int  # notes of the input table that were kept (dropped drums not counted)
    merged_notes: int  # notes merged into another of the same step, pitch and instrument
    clamped_notes: int  # pitched notes shortened to max_duration

    def __len__(self) -> int:
        return int(self.tokens.size)


@dataclass
class DecodedNotes:
    """Notes decoded from tokens, in the order the encoder writes them (step, instrument key, highest pitch,
    longest, loudest first)."""

    steps: np.ndarray  # (N,) int64
    durations: np.ndarray  # (N,) int64 steps; 1 for drum hits
    pitches: np.ndarray  # (N,) int64
    velocities: np.ndarray  # (N,) int64 0..127
    instruments: np.ndarray  # (N,) int64 key: program 0..127, DRUM_INSTRUMENT for drums

    def __len__(self) -> int:
        return int(self.steps.size)

    def notes(self, drum_durations: bool = False) -> set[tuple[int, int, int, int]]:
        """(onset step, pitch, duration, instrument key) of each note; drum durations as 0 unless asked."""
        durations = self.durations if drum_durations else np.where(self.instruments == DRUM_INSTRUMENT, 0,
                                                                  self.durations)
        return set(zip(self.steps.tolist(), self.pitches.tolist(), durations.tolist(), self.instruments.tolist()))


# ---- velocities -------------------------------------------------------------------------------
def velocity_bins(velocities: np.ndarray | int, bins: int) -> np.ndarray:
    """The bin (1..bins) of each velocity (0..127; 0 falls in bin 1)."""
    v = np.asarray(velocities, dtype=np.int64)
    return np.clip(1 + (v - 1) * bins // 127, 1, bins)


def bin_velocities(bins_: np.ndarray | int, bins: int) -> np.ndarray:
    """The velocity at the centre of each bin (1..bins): what decoding writes. The rounded-down centre,
    1 + ((2b - 1) * 127) // (2 * bins), except where that falls below the bin (narrow bins, e.g. bin 44 of 65):
    there the bin's lowest velocity, so that `velocity_bins(bin_velocities(b)) == b` for every b and bins."""
    b = np.asarray(bins_, dtype=np.int64)
    lowest = -((-(b - 1) * 127) // bins)  # ceil((b - 1) * 127 / bins): the bin's lowest velocity, less one
    return 1 + np.maximum(((2 * b - 1) * 127) // (2 * bins), lowest)


# ---- encode -----------------------------------------------------------------------------------
def _sort_fields(fields: list[np.ndarray], widths: list[int]) -> list[np.ndarray]:
    """The columns `fields` (non-negative ints, each below 2**width) sorted together, first field first:
    packed into as few int64 keys as hold them, one sort (np.sort when one key holds all, else lexsort)."""
    keys: list[tuple[np.ndarray, list[tuple[int, int]]]] = []  # (key, [(field index, shift)])
    current: list[int] = []
    for index, width in enumerate(widths):
        if current and sum(widths[i] for i in current) + width > 63:
            keys.append(_pack(fields, widths, current))
            current = []
        current.append(index)
    keys.append(_pack(fields, widths, current))
    if len(keys) == 1:
        sorted_keys = [np.sort(keys[0][0])]
    else:
        order = np.lexsort([key for key, _ in reversed(keys)])
        sorted_keys = [key[order] for key, _ in keys]
    columns: list[np.ndarray] = [np.empty(0)] * len(fields)
    for key, (_, layout) in zip(sorted_keys, keys):
        for index, shift in layout:
            columns[index] = (key >> shift) & ((1 << widths[index]) - 1)
    return columns


def _pack(fields: list[np.ndarray], widths: list[int], indices: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    shift = sum(widths[i] for i in indices)
    key = np.zeros(fields[indices[0]].size, dtype=np.int64)
    layout = []
    for index in indices:
        shift -= widths[index]
        key |= fields[index] << shift
        layout.append((index, shift))
    return key, layout


def encode_multitrack(tables: Sequence[NoteTable], config: TokenizerConfig) -> list[MultitrackSong]:
    """Encode the notes of several files in one vectorised pass. Raises `BadMidiError` naming the first
    file whose notes cannot be encoded."""
    if not config.instruments:
        raise MidigenError("encode_multitrack needs a config with instruments on")
    if not tables:
        return []
    vocab = config.vocab
    files = []
    for table in tables:
        if not config.keep_drums:
            if table.drums.any():
                table = table.select(~table.drums)
            if len(table) == 0:
                raise BadMidiError(table.path, "only drum notes (drums are dropped)")
        elif len(table) == 0:
            raise BadMidiError(table.path, "no notes")
        files.append(table)
    num_songs = len(files)
    counts = [len(table) for table in files]
    songs = song_of_each(counts)

    onsets, lengths = quantised_steps(files, songs, config.steps_per_quarter)
    drums = np.concatenate([table.drums for table in files])
    clamped = np.bincount(songs[(lengths > config.max_duration) & ~drums], minlength=num_songs)
    durations = np.where(drums, 1, np.clip(lengths, 1, config.max_duration))
    instruments = np.where(drums, DRUM_INSTRUMENT, np.concatenate([table.programs for table in files]))
    pitches = np.concatenate([table.pitches for table in files])
    velocities = np.concatenate([table.velocities for table in files])

    # sort by song, step, instrument, highest pitch, longest, loudest
    dur_bits = int(config.max_duration).bit_length()
    song_, step, inst, neg_pitch, neg_dur, neg_vel = _sort_fields(
        [songs, onsets, instruments, 127 - pitches, config.max_duration - durations, 127 - velocities],
        [max(1, (num_songs - 1).bit_length()), max(1, int(onsets.max()).bit_length()), 8, 7, dur_bits, 7],
    )
    pitch, dur, vel = 127 - neg_pitch, config.max_duration - neg_dur, 127 - neg_vel
    is_drum = inst == DRUM_INSTRUMENT
    # unisons: of one song, step, instrument and pitch keep the first (longest, or loudest hit)
    same = np.zeros(step.size, dtype=bool)
    same[1:] = (song_[1:] == song_[:-1]) & (step[1:] == step[:-1]) & (inst[1:] == inst[:-1]) & (pitch[1:] == pitch[:-1])
    merge = same & (is_drum if not config.merge_unisons else True)
    merged = np.bincount(song_[merge], minlength=num_songs)
    if merge.any():
        keep = ~merge
        song_, step, inst, pitch, dur, vel, is_drum = (a[keep] for a in (song_, step, inst, pitch, dur, vel, is_drum))
    n = step.size

    # which notes open an instrument run, and which carry a velocity token
    opens_run = np.ones(n, dtype=bool)
    opens_run[1:] = (song_[1:] != song_[:-1]) | (step[1:] != step[:-1]) | (inst[1:] != inst[:-1])
    has_inst = opens_run & ~is_drum
    if config.velocity_bins:
        bins = velocity_bins(vel, config.velocity_bins)
        by_instrument = np.argsort(song_ * INSTRUMENT_KEYS + inst, kind="stable")
        changes = np.ones(n, dtype=bool)
        b, s, k = bins[by_instrument], song_[by_instrument], inst[by_instrument]
        changes[1:] = (b[1:] != b[:-1]) | (s[1:] != s[:-1]) | (k[1:] != k[:-1])
        has_vel = np.empty(n, dtype=bool)
        has_vel[by_instrument] = changes
    else:
        bins = np.zeros(n, dtype=np.int64)
        has_vel = np.zeros(n, dtype=bool)

    # rows: a gap row before each new onset group (split when longer than max_duration), then the notes
    rows = position_rows(step, np.arange(n, dtype=np.int64), dur, song_)
    if n and int(rows[:, ROW_DURATION].max()) > config.max_duration:
        rows = split_long_gaps(rows, config.max_duration)
    is_gap = rows[:, ROW_NOTE] == GAP
    note = np.where(is_gap, 0, rows[:, ROW_NOTE])
    row_song, row_step, row_len = rows[:, ROW_SONG], rows[:, ROW_STEP], rows[:, ROW_DURATION]
    row_count = np.where(is_gap, 2, has_inst[note].astype(np.int64) + has_vel[note] + 2 - is_drum[note])
    ends = np.cumsum(row_count)
    starts = ends - row_count + 2 * row_song + 1  # songs before add their <sos> <eos>, this song its <sos>
    bounds = np.zeros(num_songs + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_song, weights=row_count, minlength=num_songs).astype(np.int64) + 2, out=bounds[1:])
    firsts, lasts = bounds[:-1], bounds[1:] - 1

    total = int(bounds[-1])
    tokens = np.empty(total, dtype=np.int64)
    steps = np.empty(total, dtype=np.int64)
    features = np.empty(total, dtype=np.int64)
    body = np.ones(total, dtype=bool)
    body[firsts] = False
    body[lasts] = False
    row_feature = np.where(is_gap, 0, np.where(is_drum[note], DRUM_FEATURE, 1 + inst[note]))
    steps[body] = np.repeat(row_step, row_count)
    features[body] = np.repeat(row_feature, row_count)

    duration_id = vocab.ids_of("duration").start - 1
    gap_at = starts[is_gap]
    tokens[gap_at] = Vocab.SEP
    tokens[gap_at + 1] = duration_id + row_len[is_gap]
    steps[gap_at + 1] += row_len[is_gap]

    at = starts[~is_gap]  # the note rows' first tokens, in note order (rows keep it)
    tokens[at[has_inst]] = vocab.ids_of("instrument").start + inst[has_inst]
    at = at + has_inst
    tokens[at] = np.where(is_drum, vocab.ids_of("hit").start, vocab.ids_of("note").start) + pitch
    if config.velocity_bins:
        tokens[at[has_vel] + 1] = vocab.ids_of("velocity").start - 1 + bins[has_vel]
    pitched = ~is_drum
    tokens[(at + 1 + has_vel)[pitched]] = duration_id + dur[pitched]

    tokens[firsts], tokens[lasts] = Vocab.SOS, Vocab.EOS
    steps[firsts] = 0
    steps[lasts] = steps[lasts - 1]
    features[firsts] = 0
    features[lasts] = 0
    return [
        MultitrackSong(tokens[start:end], steps[start:end], features[start:end], grid_of(table, config),
                       notes=len(table), merged_notes=merged_here, clamped_notes=clamped_here)
        for table, merged_here, clamped_here, start, end
        in zip(files, merged.tolist(), clamped.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())
    ]


# ---- decode -----------------------------------------------------------------------------------
def family_codes(vocab: Vocab) -> np.ndarray:
    """(V,) the family code (SPECIAL, NOTE, ...) of each token id."""
    codes = np.zeros(vocab.size, dtype=np.int64)
    for family, code in FAMILY_CODES.items():
        ids = vocab.ids_of(family)
        codes[ids.start : ids.stop] = code
    return codes


def _checked(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    outside = (tokens < 0) | (tokens >= vocab.size)
    if outside.any():
        raise MidigenError(f"token id {int(tokens[outside][0])} is outside the vocabulary (size {vocab.size})")
    return tokens


def _shifted(array: np.ndarray, by: int, fill: int) -> np.ndarray:
    """`array` moved `by` places later (by > 0: each slot holds the element before it) or earlier (by < 0)."""
    out = np.full_like(array, fill)
    if by > 0:
        out[by:] = array[:-by]
    elif by < 0:
        out[:by] = array[-by:]
    return out


def _current_program(family: np.ndarray, values: np.ndarray) -> np.ndarray:
    """At each token, the program of the last instrument token at or before it (0 before any)."""
    if family.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.maximum.accumulate(np.where(family == INSTRUMENT, np.arange(family.size), -1))
    return np.where(last >= 0, values[np.maximum(last, 0)], 0)


def instrument_feature(tokens: np.ndarray, config: TokenizerConfig) -> np.ndarray:
    """The `instruments` feature of each token of a grammatical sequence (as `encode_multitrack` gives it)."""
    vocab = config.vocab
    tokens = _checked(tokens, vocab)
    family = family_codes(vocab)[tokens]
    values = vocab.values()[tokens]
    pitched = 1 + _current_program(family, values)
    feature = np.zeros(tokens.size, dtype=np.int64)
    feature[family == INSTRUMENT] = 1 + values[family == INSTRUMENT]
    note = family == NOTE
    feature[note] = pitched[note]
    note_duration = (family == DURATION) & (_shifted(tokens, 1, Vocab.PAD) != Vocab.SEP)
    feature[note_duration] = pitched[note_duration]
    feature[family == HIT] = DRUM_FEATURE
    velocity = family == VELOCITY
    feature[velocity] = np.where(_shifted(family, 1, SPECIAL)[velocity] == HIT, DRUM_FEATURE, pitched[velocity])
    return feature


def decode_multitrack(tokens: np.ndarray, config: TokenizerConfig) -> DecodedNotes:
    """Tokens → notes. Ignores `<pad>` and `<sos>`, stops at the first `<eos>`; a note without its duration
    (a truncated sequence) is dropped; drum hits last one step. Notes come back sorted as the encoder writes
    them, unisons merged as it merges them."""
    vocab = config.vocab
    tokens = _checked(tokens, vocab)
    eos = np.flatnonzero(tokens == Vocab.EOS)
    if eos.size:
        tokens = tokens[: eos[0]]
    tokens = tokens[(tokens != Vocab.PAD) & (tokens != Vocab.SOS)]
    family = family_codes(vocab)[tokens]
    values = vocab.values()[tokens]
    after = _shifted(family, -1, SPECIAL)  # the family of the next token
    gap = (family == DURATION) & (_shifted(tokens, 1, Vocab.PAD) == Vocab.SEP)
    time = np.cumsum(np.where(gap, values, 0))
    program = _current_program(family, values)

    events = np.flatnonzero((family == NOTE) | (family == HIT))  # every note and hit, kept or not
    is_hit = family[events] == HIT
    key = np.where(is_hit, DRUM_INSTRUMENT, program[events])
    direct = after[events] == VELOCITY  # the note's own velocity token follows it
    if config.velocity_bins and events.size:
        # each event's bin: the velocity token right after it, else the last one of its instrument
        by_instrument = np.argsort(key, kind="stable")
        k, d = key[by_instrument], direct[by_instrument]
        index = np.arange(events.size)
        source = np.maximum.accumulate(np.where(d, index, -1))
        group_start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        first_of_group = np.repeat(group_start, np.diff(np.r_[group_start, events.size]))
        known = source >= first_of_group
        # (where `source` is −1 the bin is unknown and unused: read any token)
        bin_sorted = values[np.minimum(events[by_instrument][np.maximum(source, 0)] + 1, tokens.size - 1)]
        velocity_sorted = np.where(known, bin_velocities(np.maximum(bin_sorted, 1), config.velocity_bins),
                                   DEFAULT_VELOCITY)
        velocity = np.empty(events.size, dtype=np.int64)
        velocity[by_instrument] = velocity_sorted
    else:
        velocity = np.full(events.size, DEFAULT_VELOCITY, dtype=np.int64)

    duration_at = np.minimum(events + 1 + direct, max(tokens.size - 1, 0))
    complete = is_hit | ((events + 1 + direct < tokens.size) & (family[duration_at] == DURATION))
    duration = np.where(is_hit, 1, values[duration_at])
    events, is_hit, key, velocity, duration = (a[complete] for a in (events, is_hit, key, velocity, duration))
    step, pitch = time[events], values[events]
    order = np.lexsort((-velocity, -duration, -pitch, key, step))
    step, pitch, key, velocity, duration, is_hit = (a[order] for a in (step, pitch, key, velocity, duration, is_hit))
    same = np.zeros(step.size, dtype=bool)
    same[1:] = (step[1:] == step[:-1]) & (key[1:] == key[:-1]) & (pitch[1:] == pitch[:-1])
    merge = same & (is_hit if not config.merge_unisons else True)
    if merge.any():
        keep = ~merge
        step, pitch, key, velocity, duration = (a[keep] for a in (step, pitch, key, velocity, duration))
    return DecodedNotes(step, duration, pitch, velocity, key)


# ---- score ------------------------------------------------------------------------------------
def multitrack_score(notes: DecodedNotes, grid: BarGrid, tempos: Sequence[tuple[int, float]],
                     config: TokenizerConfig) -> symusic.Score:
    """Decoded notes as a `symusic.Score` in ticks: one track per instrument (ascending key) named after its
    General MIDI program ("Drums" for the drum kit, on channel 10), plus an extra track of that instrument for
    each further layer of notes that start while one of the same pitch still sounds. `tempos` are (step, qpm)
    pairs; `config.tempo_qpm` at step 0 if none."""
    tpq = ticks_per_quarter_of(config)
    ticks_per_step = tpq // config.steps_per_quarter
    score = symusic.Score(tpq)
    for step, qpm in (tempos or [(0, config.tempo_qpm)]):
        score.tempos.append(symusic.Tempo(int(step) * ticks_per_step, float(qpm)))
    for change in grid.time_signatures():
        score.time_signatures.append(
            symusic.TimeSignature(change.step * ticks_per_step, change.numerator, change.denominator)
        )
    keys = np.asarray(notes.instruments, dtype=np.int64)
    layers = overlap_layers(keys * NUM_PITCHES + notes.pitches, notes.steps, notes.durations)
    for key in np.unique(keys).tolist():
        of_key = keys == key
        name = gm_name(key)
        drum = key == DRUM_INSTRUMENT
        for layer in np.unique(layers[of_key]).tolist():
            chosen = of_key & (layers == layer)
            track = symusic.Track(name if layer == 0 else f"{name} (overlapping notes {layer})",
                                  program=0 if drum else key, is_drum=drum)
            track.notes = symusic.Note.from_numpy(
                time=(notes.steps[chosen] * ticks_per_step).astype(np.int32),
                duration=(notes.durations[chosen] * ticks_per_step).astype(np.int32),
                pitch=notes.pitches[chosen].astype(np.int8),
                velocity=notes.velocities[chosen].astype(np.int8),
            )
            score.tracks.append(track)
    return score


__all__ = [
    "DEFAULT_VELOCITY",
    "DRUM_FEATURE",
    "DecodedNotes",
    "MultitrackSong",
    "bin_velocities",
    "decode_multitrack",
    "encode_multitrack",
    "instrument_feature",
    "multitrack_score",
    "velocity_bins",
]
