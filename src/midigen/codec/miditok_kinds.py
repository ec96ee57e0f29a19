"""MidiTok's tokenizations (REMI, TSD, MIDI-Like) as midigen tokenizer kinds, behind the `Tokenizer` interface.

MidiTok encodes; midigen keeps its own ids for the specials (`<pad>` 0, `<sos>` 1, `<eos>` 2: MidiTok's default special
tokens PAD, BOS, EOS give exactly those) and wraps each song in `<sos> ... <eos>`. A step is one of MidiTok's ticks:
MidiTok resamples a score to `max_num_pos_per_beat` ticks per beat, which is `steps_per_quarter` per quarter because
every time signature it keeps is in quarters (x/4; see `TokenizerConfig._check_miditok`). Each token's step and
features come from MidiTok's events: the event's time (a time token, `TimeShift` or REMI's `Bar` and `Position`, sits
at the time it moves to, as the seed's gap duration does), its bar and position in the bar in the bar grid of the
time signatures MidiTok kept, and its instrument from the `Program` event before it.

What the encoding loses, beyond what MidiTok's own round trip loses (timing finer than the grid, durations beyond
`max_duration` (clamped), tempo changes, controllers, pedals, pitch bends, key signatures, track names, the split of
tracks sharing a program, and, with `merge_unisons`, all but the shortest of notes sharing pitch, onset and
instrument):
- time signatures in eighths (x/8) or halves (x/2) become the signature of the same bar length in quarters (6/8 →
  3/4, 2/2 → 4/4); those of no whole number of quarters (3/8, 7/8) are dropped, as MidiTok drops unsupported ones,
  and the bars go on in the signature before;
- with `instruments` off, every kept note (drums included when kept) goes into one piano stream, as in the seed's
  single stream; with `keep_drums` off, drum tracks are dropped.

The grammar (`MiditokGrammar`) is MidiTok's own graph of which token type may follow which, as a table, plus what the
graph cannot say: REMI positions rise within a bar and stay inside it, a time signature starts a bar, a `Program`
of the drums is followed by drum pitches and any other by pitched ones, MIDI-Like notes are switched off only while
on (and on only while off) and a song ends with every note off. Its state tracks the step, the bar and position in
the bar and the current instrument, so generation gets the same features the encoder writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import symusic

from midigen.codec.config import NUM_PITCHES, PAD_ID, TokenFamilies, TokenizerConfig, Vocab
from midigen.codec.grammar import NOTE_FIELDS, Fed
from midigen.codec.midi_io import DRUM_INSTRUMENT, NoteTable, read_notes
from midigen.codec.rows import ticks_per_quarter_of
from midigen.codec.timing import BarGrid, ticks_to_steps
from midigen.codec.tokenizer import (
    INSTRUMENT_FEATURES,
    EncodedFile,
    TokenSequence,
    array_dtypes_of,
    feature_sizes_of,
    instruments_of,
    one_hot_counts,
    pitch_lookups,
)
from midigen.errors import BadMidiError, MidigenError

if TYPE_CHECKING:  # importing MidiTok takes seconds: only a MidiTok kind's tokenizer does
    import miditok
    import torch

MIDITOK_CLASSES = {"remi": "REMI", "tsd": "TSD", "midilike": "MIDILike"}
SPECIAL_TOKENS = ["PAD", "BOS", "EOS", "MASK"]  # MidiTok's default: ids 0, 1, 2 are midigen's <pad> <sos> <eos>
NO_INSTRUMENT, DRUMS = 0, INSTRUMENT_FEATURES - 1  # the `instruments` feature: 0 none, 1 + program, 129 drums

# MidiTok token type → midigen family (what `Vocab.ids_of` callers ask for).
FAMILIES = {"PAD": "special", "BOS": "special", "EOS": "special", "MASK": "special", "Pitch": "note", "NoteOn": "note",
            "NoteOff": "note_off", "PitchDrum": "hit", "DrumOn": "hit", "DrumOff": "hit_off", "Program": "instrument",
            "Velocity": "velocity", "Duration": "duration", "TimeShift": "time_shift", "Bar": "bar",
            "Position": "position", "TimeSig": "time_signature"}
NOTE_STARTS = ("Pitch", "NoteOn", "PitchDrum", "DrumOn")  # the token types that start a sounding note
DRUM_TYPES = ("PitchDrum", "DrumOn", "DrumOff")
PITCHED_TYPES = ("Pitch", "NoteOn", "NoteOff")
# token types whose `instruments` feature is the current instrument (the others, time and specials, carry none)
INSTRUMENT_CARRIERS = ("Program", "Velocity", "Duration", *PITCHED_TYPES, *DRUM_TYPES)
# the token types after which a song may end: a note is complete, or a time signature after the last note
SONG_ENDS = {"remi": ("Duration", "TimeSig"), "tsd": ("Duration", "TimeSig"),
             "midilike": ("NoteOff", "DrumOff", "TimeSig")}

# Components of a lane's grammar state (`MiditokGrammar.states`).
PHASE, CLOCK, BAR, BAR_START, BAR_STEPS, POSITION, INSTRUMENT, PENDING, OPEN, ONSETS = range(10)
NO_BAR_YET = -2  # POSITION before REMI's first `Bar` (−1: a bar begun, no position yet)


def quarter_signature(numerator: int, denominator: int) -> tuple[int, int]:
    """The x/4 time signature of the same bar length (6/8 → 3/4, 2/2 → 4/4); unchanged if there is none."""
    quarters, rest = divmod(numerator * 4, denominator)
    return (quarters, 4) if quarters >= 1 and rest == 0 else (numerator, denominator)


def miditok_config(config: TokenizerConfig) -> miditok.TokenizerConfig:
    """MidiTok's config for `config`: our defaults (all 128 pitches, `steps_per_quarter` positions per quarter up to
    `max_duration`, time signatures up to `max_bar_quarters` quarters, programs in one stream with instruments, drums,
    velocities, unisons), with `config.miditok` merged over them."""
    import miditok

    spq = config.steps_per_quarter
    params: dict[str, Any] = {
        "pitch_range": (0, NUM_PITCHES - 1),
        "drum_pitch_range": (0, NUM_PITCHES - 1),
        "beat_res": {(0, config.max_duration // spq): spq},
        "use_velocities": bool(config.velocity_bins),
        "num_velocities": max(config.velocity_bins, 1),
        "use_time_signatures": True,
        "time_signature_range": {4: list(range(1, config.max_bar_quarters + 1))},
        "use_programs": config.instruments,
        "one_token_stream_for_programs": config.instruments,
        "programs": list(range(-1 if config.keep_drums else 0, 128)),
        "use_pitchdrum_tokens": True,
        "remove_duplicated_notes": config.merge_unisons,
        "special_tokens": SPECIAL_TOKENS,
    }
    for name, value in config.miditok.items():
        if name == "time_signature_range":
            value = {int(denominator): list(numerators) for denominator, numerators in value.items()}
        elif name.endswith("_range"):
            value = tuple(value)
        params[name] = value
    if config.kind == "midilike":  # a note never switched off lasts `max_duration`, as the longest one encoded
        params["max_duration"] = (config.max_duration // spq, 0, spq)
    return miditok.TokenizerConfig(**params)


class MiditokVocab(TokenFamilies):
    """The vocabulary of a MidiTok tokenizer, with the methods callers use on `Vocab`: families from MidiTok's token
    types (`FAMILIES`), each a contiguous block of ids."""

    def __init__(self, backend: miditok.MusicTokenizer, steps_per_quarter: int) -> None:
        import miditok

        names = [""] * len(backend.vocab)
        for name, index in backend.vocab.items():
            names[index] = name
        self.token_names = names
        self.size = len(names)
        self.types = [name.split("_")[0] for name in names]
        families = np.array([FAMILIES[token_type] for token_type in self.types])
        self.families: dict[str, range] = {}
        for family in dict.fromkeys(families.tolist()):
            ids = np.flatnonzero(families == family)
            if ids[-1] - ids[0] + 1 != ids.size:
                raise MidigenError(f"MidiTok's {family} tokens are not contiguous")
            self.families[family] = range(int(ids[0]), int(ids[-1]) + 1)
        values = np.zeros(self.size, dtype=np.int64)
        for index, (token_type, name) in enumerate(zip(self.types, names)):
            value = name.split("_", 1)[1]
            if token_type == "Program":
                values[index] = DRUM_INSTRUMENT if int(value) == -1 else int(value)
            elif token_type in ("Duration", "TimeShift"):
                values[index] = miditok.MusicTokenizer._time_token_to_ticks(value, steps_per_quarter)
            elif token_type == "TimeSig":
                values[index] = int(value.split("/")[0]) * steps_per_quarter  # x/4: the bar's length in steps
            elif token_type in FAMILIES and FAMILIES[token_type] != "special" and value.lstrip("-").isdigit():
                values[index] = int(value)
            else:
                values[index] = index if token_type in SPECIAL_TOKENS else 0
        self._values = values

    def types_of(self, token_types: Sequence[str]) -> np.ndarray:
        """(V,) bool: which ids are of one of MidiTok's `token_types`."""
        return np.isin(np.array(self.types), list(token_types))

    def values(self) -> np.ndarray:
        """(V,) each token's value: pitch of a note, program of an instrument (128 drums), velocity, steps of a
        duration or time shift, position in the bar, bar length in steps of a time signature, index of a special."""
        return self._values.copy()

    def names(self) -> list[str]:
        """MidiTok's name of every token id (`Pitch_60`, `TimeShift_1.0.8`...), in id order."""
        return list(self.token_names)

    def describe(self, tokens: Sequence[int] | np.ndarray) -> list[str]:
        return [self.token_names[int(t)] for t in tokens]


class MiditokTokenizer:
    """A MidiTok tokenization (`config.kind`: remi, tsd or midilike) as a midigen `Tokenizer`."""

    def __init__(self, config: TokenizerConfig) -> None:
        if config.kind not in MIDITOK_CLASSES:
            raise MidigenError(f"not a MidiTok kind: {config.kind!r}")
        import miditok

        self.config = config
        self.backend = getattr(miditok, MIDITOK_CLASSES[config.kind])(miditok_config(config))
        for name, index in (("PAD_None", PAD_ID), ("BOS_None", Vocab.SOS), ("EOS_None", Vocab.EOS)):
            assert self.backend.vocab[name] == index, (name, self.backend.vocab[name])
        assert self.backend.config.max_num_pos_per_beat == config.steps_per_quarter
        self.vocab = MiditokVocab(self.backend, config.steps_per_quarter)

    # ---- what the rest of midigen asks (`midigen.codec.interface.Tokenizer`) -------------------
    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def array_dtypes(self) -> dict[str, type[np.generic]]:
        return array_dtypes_of(self.config)

    @property
    def feature_sizes(self) -> dict[str, int | None]:
        return feature_sizes_of(self.config)

    @cached_property
    def grammar(self) -> MiditokGrammar:
        return MiditokGrammar(self)

    def sounding(self) -> np.ndarray:
        return self.vocab.types_of(NOTE_STARTS)

    def note_counts(self) -> np.ndarray:
        return self.sounding().astype(np.int64)

    def transposable_pitches(self) -> np.ndarray:
        """Pitched notes (`Pitch`, `NoteOn`, `NoteOff`; not drums): MidiTok lists each type's pitches in order."""
        pitched = self.vocab.types_of(PITCHED_TYPES)
        return np.where(pitched, self.vocab.values(), -1)

    def token_pitches(self) -> np.ndarray:
        return self.transposable_pitches()

    def token_lookups(self) -> dict[str, np.ndarray]:
        """`pitch_classes` (1 + pitch class) and `octaves` (1 + pitch // 12) of pitched notes, 0 elsewhere."""
        return pitch_lookups(self.transposable_pitches())

    def token_value_counts(self) -> dict[str, np.ndarray]:
        return one_hot_counts(self.token_lookups())

    def instrument_tokens(self, instruments: Sequence[int]) -> np.ndarray:
        """(V,) bool: every token but the `Program` tokens of other instruments, and drums unless 128 is chosen."""
        allowed = np.ones(self.vocab.size, dtype=bool)
        allowed[self.vocab.family_of("instrument") & ~np.isin(self.vocab.values(), list(instruments))] = False
        if DRUM_INSTRUMENT not in instruments:
            allowed[self.vocab.types_of(DRUM_TYPES)] = False
        return allowed

    def token_types(self) -> dict[str, np.ndarray]:
        return {family: self.vocab.family_of(family) for family in self.vocab.families if family != "special"}

    # ---- encode -------------------------------------------------------------------------------
    def encode(self, source: str | Path | bytes | symusic.Score | NoteTable) -> TokenSequence:
        notes = source if isinstance(source, NoteTable) else read_notes(source)
        return self.encode_files([notes])[0].sequence

    def encode_files(self, tables: Sequence[NoteTable]) -> list[EncodedFile]:
        """Encode each file with MidiTok (MidiTok has no batched encoding)."""
        return [self.encode_one(table) for table in tables]

    def encode_one(self, table: NoteTable) -> EncodedFile:
        score, kept = self.score_of(table)
        prepared = self.backend.preprocess_score(score)
        if prepared.note_num() == 0:
            raise BadMidiError(table.path, f"no notes within the {self.config.kind} tokenizer's pitch range")
        assert prepared.ticks_per_quarter == self.config.steps_per_quarter  # a tick is a step (x/4 signatures only)
        if self.config.kind == "midilike":
            for track in prepared.tracks:  # one per instrument
                columns = track.notes.numpy()
                onsets, pitches = columns["time"].astype(np.int64), columns["pitch"].astype(np.int64)
                ends = self.one_note_on_per_pitch(np.zeros_like(pitches), pitches, onsets,
                                                  onsets + columns["duration"])
                track.notes = symusic.Note.from_numpy(time=columns["time"], duration=(ends - onsets).astype(np.int32),
                                                      pitch=columns["pitch"], velocity=columns["velocity"])
        encoded = self.backend.encode(prepared, no_preprocess_score=True)
        sequence = encoded[0] if isinstance(encoded, list) else encoded
        events = sequence.events
        ids = np.array(sequence.ids, dtype=np.int64)
        times = np.array([event.time for event in events], dtype=np.int64)
        times += np.where(self.vocab.types_of(("TimeShift",))[ids], self.vocab.values()[ids], 0)  # where it moves to
        tokens = np.concatenate(([Vocab.SOS], ids, [Vocab.EOS]))
        steps = np.concatenate(([0], times, times[-1:]))
        changes = tuple((int(s.time), int(s.numerator), int(s.denominator)) for s in prepared.time_signatures)
        grid = BarGrid.of(changes if self.backend.config.use_time_signatures else (), self.config.steps_per_quarter,
                          self.config.beat_positions)
        bars, beats = grid.locate(steps)
        features = {"bars": bars, "beats": beats}
        if self.config.instruments:
            features["instruments"] = self.event_instruments(tokens)
        clamped = int(np.count_nonzero(ticks_to_steps(kept.durations, self.config.steps_per_quarter,
                                                      kept.ticks_per_quarter) > self.config.max_duration))
        return EncodedFile(TokenSequence(tokens, steps, features, grid), len(kept), len(kept) - prepared.note_num(),
                           clamped, instruments_of(kept, self.config.keep_drums))

    def event_instruments(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) the `instruments` feature: the instrument of the last `Program` event, on the tokens that carry one."""
        programs = self.vocab.family_of("instrument")[tokens]
        last_program = np.maximum.accumulate(np.where(programs, np.arange(tokens.size), 0))
        program = self.vocab.values()[tokens[last_program]]
        feature = np.where(program == DRUM_INSTRUMENT, DRUMS, program + 1)
        carries = self.vocab.types_of(INSTRUMENT_CARRIERS)[tokens] & programs[last_program]
        return np.where(carries, feature, NO_INSTRUMENT)

    def score_of(self, table: NoteTable) -> tuple[symusic.Score, NoteTable]:
        """The notes MidiTok is to encode as a score, and the notes kept: drums dropped unless `keep_drums`, every
        note in one piano track unless `instruments`, time signatures in quarters (`quarter_signature`)."""
        cfg = self.config
        kept = table if cfg.keep_drums or not table.drums.any() else table.select(~table.drums)
        if len(kept) == 0:
            raise BadMidiError(table.path, "only drum notes (drums are dropped)")
        track_of = kept.tracks if cfg.instruments else np.zeros(len(kept), dtype=np.int64)
        score = symusic.Score(kept.ticks_per_quarter)
        for tick, numerator, denominator in kept.time_signatures:
            score.time_signatures.append(symusic.TimeSignature(tick, *quarter_signature(numerator, denominator)))
        for tick, qpm in kept.tempos:
            score.tempos.append(symusic.Tempo(tick, qpm))
        for track in np.unique(track_of).tolist():
            in_track = track_of == track
            first = int(np.flatnonzero(in_track)[0])
            drums = bool(kept.drums[first]) and cfg.instruments
            program = int(kept.programs[first]) if cfg.instruments else 0
            name = kept.track_names[track] if cfg.instruments else "piano"
            part = symusic.Track(name, program=program, is_drum=drums)
            part.notes = symusic.Note.from_numpy(
                time=kept.onsets[in_track].astype(np.int32), duration=kept.durations[in_track].astype(np.int32),
                pitch=kept.pitches[in_track].astype(np.int8), velocity=kept.velocities[in_track].astype(np.int8))
            score.tracks.append(part)
        return score, kept

    @staticmethod
    def one_note_on_per_pitch(instruments: np.ndarray, pitches: np.ndarray, onsets: np.ndarray,
                              ends: np.ndarray) -> np.ndarray:
        """Note ends (N,) such that a note of an instrument ends where the same pitch starts again, if it still
        sounds then: one note on per pitch, as one MIDI channel plays it (MIDI-Like's note off ends a pitch)."""
        order = np.lexsort((onsets, pitches, instruments))
        same_key = (instruments[order][1:] == instruments[order][:-1]) & (pitches[order][1:] == pitches[order][:-1])
        later_onset = onsets[order][1:]
        cut = same_key & (later_onset > onsets[order][:-1]) & (ends[order][:-1] > later_onset)
        ends = ends.copy()
        ends[order[:-1][cut]] = later_onset[cut]
        return ends

    # ---- positions ----------------------------------------------------------------------------
    def with_positions(self, tokens: np.ndarray, grid: BarGrid) -> TokenSequence:
        """Tokens (starting with `<sos>`) with the steps and features the grammar derives from them alone; bars follow
        their time signatures, which agree with `grid` when it is theirs."""
        tokens = np.asarray(tokens, dtype=np.int64)
        steps, features = self.grammar.walk(tokens)
        return TokenSequence(tokens, steps, features, grid)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, sequence: TokenSequence | np.ndarray | list[int], tempos: Sequence[tuple[int, float]] = (),
               grid: BarGrid | None = None) -> symusic.Score:
        """Tokens → a `symusic.Score` by MidiTok (time signatures from the tokens; `grid` is not needed), with
        `tempos` (step, quarter notes per minute), the config's tempo if empty."""
        tokens = np.asarray(sequence.tokens if isinstance(sequence, TokenSequence) else sequence, dtype=np.int64)
        if tokens.size and ((tokens < 0) | (tokens >= self.vocab.size)).any():
            bad = int(tokens[(tokens < 0) | (tokens >= self.vocab.size)][0])
            raise MidigenError(f"token id {bad} is outside the vocabulary (size {self.vocab.size})")
        body = tokens[tokens >= len(SPECIAL_TOKENS)].tolist()
        score = self.backend.decode(body if self.backend.one_token_stream else [body])
        score.tempos.clear()
        for step, qpm in list(tempos) or [(0, self.config.tempo_qpm)]:
            score.tempos.append(symusic.Tempo(step, qpm))
        return score.resample(ticks_per_quarter_of(self.config), min_dur=1)


class MiditokGrammar:
    """The grammar of a MidiTok kind as numpy tables (`check`, `states`, `walk`) and the same tables on a torch device
    (`on`): see the module doc. A lane's state is (phase: the last token's type, step, bar, bar start, bar length,
    REMI position, instrument, pending pitch, notes on), and for MIDI-Like the onset step of the note on of each
    instrument and pitch (−1: off)."""

    def __init__(self, tokenizer: MiditokTokenizer) -> None:
        vocab, backend, cfg = tokenizer.vocab, tokenizer.backend, tokenizer.config
        self.kind, self.max_duration, self.beat_positions = cfg.kind, cfg.max_duration, cfg.beat_positions
        self.tracks_onsets = cfg.kind == "midilike"
        self.size = ONSETS + (INSTRUMENT_FEATURES * NUM_PITCHES if self.tracks_onsets else 0)
        types = sorted(set(vocab.types))
        code = {name: index for index, name in enumerate(types)}
        self.type_of = np.array([code[t] for t in vocab.types], dtype=np.int64)  # (V,)
        graph = backend.tokens_types_graph
        follows = np.zeros((len(types), len(types)), dtype=bool)
        for before, after in graph.items():
            if FAMILIES[before] != "special":
                follows[code[before], [code[t] for t in after if t in code and FAMILIES[t] != "special"]] = True
        first = "Bar" if cfg.kind == "remi" else "TimeSig" if backend.config.use_time_signatures else "TimeShift"
        follows[code["BOS"]] = follows[code[first]] if first == "TimeShift" else np.isin(types, [first])
        self.phase_mask = follows[:, self.type_of]  # (P, V) the tokens each phase allows, before the state's rules
        self.ends = np.isin(types, SONG_ENDS[cfg.kind])  # (P,) phases after which the song may end
        self.start_phase, self.eos_phase = code["BOS"], code["EOS"]
        values = vocab.values()
        is_type = vocab.types_of
        self.is_pad = np.arange(vocab.size) == PAD_ID
        self.shift = np.where(is_type(("TimeShift",)), values, 0)
        self.duration = np.where(is_type(("Duration",)), values, 0)
        self.is_bar, self.is_position = is_type(("Bar",)), is_type(("Position",))
        self.position = np.where(self.is_position, values, -1)
        self.is_signature = is_type(("TimeSig",))
        self.signature_steps = np.where(self.is_signature, values, 0)
        self.pitch = np.where(is_type(PITCHED_TYPES + DRUM_TYPES), values, -1)
        self.pitch_column = np.maximum(self.pitch, 0)
        self.is_drum_type, self.is_pitched_type = is_type(DRUM_TYPES), is_type(PITCHED_TYPES)
        self.starts_note, self.ends_note = is_type(NOTE_STARTS), is_type(("NoteOff", "DrumOff"))
        self.notes_on = self.starts_note.astype(np.int64) - self.ends_note  # how a token changes the notes on
        program = vocab.values()
        self.instrument = np.where(vocab.family_of("instrument"),
                                   np.where(program == DRUM_INSTRUMENT, DRUMS, program + 1), -1)
        self.carries_instrument = is_type(INSTRUMENT_CARRIERS) & cfg.instruments
        self.feature_names = tuple(tokenizer.feature_sizes)
        start = np.zeros(self.size, dtype=np.int64)
        start[[PHASE, BAR_STEPS, POSITION, PENDING]] = (self.start_phase, 4 * cfg.steps_per_quarter, NO_BAR_YET, -1)
        start[ONSETS:] = -1
        self.start = start  # the state after `<sos>` (4/4 until a time signature says otherwise, as MidiTok)
        self.lanes = Lanes(self, np)

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None (a leading `<sos>` is the start)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        state = self.start[None]
        for index, token in enumerate(tokens.tolist()):
            if index == 0 and token == Vocab.SOS:
                continue
            if not self.lanes.allowed(state, True)[0, token]:
                return index
            state = self.lanes.feed(state, np.array([token])).state
        return None

    def states(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """(B, S) the state after each sequence (each starts with `<sos>`)."""
        rows = []
        for tokens in sequences:
            state = self.start[None]
            for token in np.asarray(tokens, dtype=np.int64)[1:].tolist():
                state = self.lanes.feed(state, np.array([token])).state
            rows.append(state[0])
        return np.stack(rows) if rows else np.zeros((0, self.size), dtype=np.int64)

    def walk(self, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Each token's step and features, as generation derives them, for a sequence that starts with `<sos>`."""
        state, steps = self.start[None], np.zeros(tokens.size, dtype=np.int64)
        features = {name: np.zeros(tokens.size, dtype=np.int64) for name in self.feature_names}
        for index, token in enumerate(tokens[1:].tolist(), start=1):
            fed = self.lanes.feed(state, np.array([token]))
            steps[index] = state[0, CLOCK] + fed.lead[0]
            state = fed.state
            for name, value in fed.features.items():
                features[name][index] = value[0]
        return steps, features

    def on(self, device: torch.device) -> Lanes:
        import torch

        return Lanes(self, torch, device)


class Lanes:
    """A `MiditokGrammar`'s rules over a batch of lanes, written once for numpy (checking, walking) and torch
    (generation, a `LaneGrammar`): the tables are arrays of either."""

    TABLES = ("type_of", "phase_mask", "ends", "is_pad", "shift", "duration", "is_bar", "is_position", "position",
              "is_signature", "signature_steps", "pitch", "pitch_column", "is_drum_type", "is_pitched_type",
              "starts_note", "ends_note", "notes_on", "instrument", "carries_instrument")

    def __init__(self, grammar: MiditokGrammar, xp: Any, device: Any = None) -> None:
        self.xp, self.grammar = xp, grammar
        convert = (lambda array: array) if xp is np else (lambda array: xp.as_tensor(array, device=device))
        for name in self.TABLES:
            setattr(self, name, convert(getattr(grammar, name)))
        self.arange = (lambda n: np.arange(n)) if xp is np else (lambda n: xp.arange(n, device=device))

    def _onsets(self, state: Any) -> Any:
        """(B, P) the onset step of each pitch of the lane's current instrument (−1: off)."""
        rows = state[:, ONSETS:].reshape(state.shape[0], INSTRUMENT_FEATURES, NUM_PITCHES)
        return rows[self.arange(state.shape[0]), state[:, INSTRUMENT]]

    def allowed(self, state: Any, allow_end: bool) -> Any:
        """(B, V) bool: the tokens each lane may take next."""
        phase, instrument = state[:, PHASE], state[:, INSTRUMENT]
        mask = self.phase_mask[phase]
        drums = (instrument == DRUMS)[:, None]
        mask = mask & ~(self.is_drum_type & ~drums) & ~(self.is_pitched_type & drums)
        rises = (self.position > state[:, POSITION, None]) & (self.position < state[:, BAR_STEPS, None])
        mask = mask & (~self.is_position | rises)
        mask = mask & (~self.is_signature | (state[:, CLOCK] == state[:, BAR_START])[:, None])  # starts a bar
        if self.grammar.tracks_onsets:
            onsets = self._onsets(state)[:, self.pitch_column]  # (B, V)
            mask = mask & (~self.starts_note | (onsets < 0))
            mask = mask & (~self.ends_note | ((onsets >= 0) & (onsets < state[:, CLOCK, None])))
        if allow_end:
            end = self.ends[phase] & (state[:, OPEN] == 0)
            mask[:, Vocab.EOS] = mask[:, Vocab.EOS] | end
        return mask

    def feed(self, state: Any, tokens: Any) -> Fed:
        """Each lane's state after its token (B,): the token sits at the step it moves time to (`lead` = `advance`),
        with its bar, position in the bar and instrument, and the note it completes (a duration, a note off)."""
        xp, where = self.xp, self.xp.where
        new = state.copy() if xp is np else state.clone()
        clock, bar_start, bar_steps = state[:, CLOCK], state[:, BAR_START], state[:, BAR_STEPS]
        bar_target = where(state[:, POSITION] == NO_BAR_YET, 0, bar_start + bar_steps)  # REMI: a bar after a bar
        advance = where(self.is_bar[tokens], bar_target - clock, self.shift[tokens])
        advance = where(self.is_position[tokens], bar_start + self.position[tokens] - clock, advance)
        now = clock + advance
        crossed = (now - bar_start) // bar_steps
        new[:, BAR] = state[:, BAR] + crossed
        new[:, BAR_START] = bar_start + crossed * bar_steps
        new[:, BAR_STEPS] = where(self.is_signature[tokens], self.signature_steps[tokens], bar_steps)
        new[:, CLOCK] = now
        new[:, PHASE] = self.type_of[tokens]
        new[:, POSITION] = where(self.is_bar[tokens], -1, where(self.is_position[tokens], self.position[tokens],
                                                                  state[:, POSITION]))
        instrument = where(self.instrument[tokens] >= 0, self.instrument[tokens], state[:, INSTRUMENT])
        new[:, INSTRUMENT] = instrument
        pitch = self.pitch[tokens]
        new[:, PENDING] = where(self.starts_note[tokens], pitch, state[:, PENDING])
        program = where(instrument > 0, instrument - 1, 0)
        if self.grammar.tracks_onsets:  # a note off completes the note on of its pitch
            rows = self.arange(state.shape[0])
            column = ONSETS + instrument * NUM_PITCHES + self.pitch_column[tokens]
            onset = state[rows, column]
            switched = self.starts_note[tokens] | self.ends_note[tokens]
            new[rows, column] = where(switched, where(self.starts_note[tokens], now, -1), onset)
            new[:, OPEN] = state[:, OPEN] + self.notes_on[tokens]
            done = self.ends_note[tokens]
            offset, held = onset - clock, now - onset
            length = where(held > self.grammar.max_duration, self.grammar.max_duration, held)  # as MidiTok clamps
        else:  # a duration completes the note whose pitch came before it
            done = (self.duration[tokens] > 0) & (state[:, PENDING] >= 0)
            pitch = state[:, PENDING]
            offset, length = xp.zeros_like(now), self.duration[tokens]
        notes = xp.stack([offset, where(done, pitch, -1), length, program], 1)[:, None]  # (B, 1, NOTE_FIELDS)
        assert notes.shape[2] == NOTE_FIELDS
        keep = self.is_pad[tokens][:, None]
        new = where(keep, state, new)  # padding changes nothing
        beats = (now - new[:, BAR_START]) % self.grammar.beat_positions
        features = {"bars": new[:, BAR], "beats": beats}
        if "instruments" in self.grammar.feature_names:
            features["instruments"] = where(self.carries_instrument[tokens], instrument, NO_INSTRUMENT)
        return Fed(new, advance, advance, features, notes)
