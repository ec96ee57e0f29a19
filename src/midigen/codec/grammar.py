"""Which tokens may legally come next, as tables, so that every generated sequence decodes.

The seed codec's grammar. A song is `<sos>`, onset groups separated by gaps (`<sep> d`; only a full `max_duration`
gap may be followed by another `<sep>`), then `<eos>`. Single stream, a group is notes `n d`, highest pitch first.
With instruments, a group is a run per pitched instrument, `i` then its notes `n [v] d` highest pitch first, programs
ascending, then drum hits `h [v]`, highest first; a velocity `v` follows the note or hit it belongs to.

A lane's state is three numbers: its phase (what the last token was), the lowest pitch of its current run (notes must
go lower) and its current instrument (0 none, 1 + program, `DRUMS` for the drum run). Every rule is a table look-up:
`allowed = phase_mask[phase] & instrument_mask[instrument] & lowest_mask[instrument == DRUMS, lowest]`, and the next
state is `next_*[phase, token]` (−1: unchanged). The same tables run in numpy (checking a sequence) and in torch on
the model's device (many lanes at once, `DeviceGrammar`), where a lane's state also keeps the pitch of the note awaiting
its duration, so that the duration token reports the note it completes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab

if TYPE_CHECKING:  # torch is imported where the tables go to a device: encoding workers never load it
    import torch

PHASES = ("start", "after_sep", "after_gap", "after_full_gap", "after_instrument", "after_note", "after_note_velocity",
          "after_note_duration", "after_hit", "after_hit_velocity", "end")
NO_INSTRUMENT, DRUMS = 0, 129  # the instrument component (and `instruments` feature): 0, 1 + program, or drums
NO_LOWEST = NUM_PITCHES  # the lowest-pitch component of a run with no note yet
KEEP = -1


NOTE_FIELDS = 4  # a `Fed.notes` row: (offset, pitch, length, instrument)


@dataclass
class Fed:
    """What one token did to each lane of a batch (`LaneGrammar.feed`)."""

    state: torch.Tensor  # (B, S) each lane's grammar state after the token
    lead: torch.Tensor  # (B,) steps from the lane's step before the token to the token's own step
    advance: torch.Tensor  # (B,) steps from the lane's step before the token to its step after it (>= lead)
    features: dict[str, torch.Tensor]  # name → (B,): the token's features that follow from the grammar state
    notes: torch.Tensor  # (B, N, NOTE_FIELDS) notes the token completes: (onset offset from the step before the
    # token, pitch, length in steps (1 for a drum hit), instrument (program, 128 drums, 0 in a single stream));
    # rows with pitch −1 are empty


class GrammarTables:
    """The grammar of sequences encoded with `config`, as numpy tables (see the module doc)."""

    def __init__(self, config: TokenizerConfig) -> None:
        vocab = self.vocab = config.vocab
        self.instruments = config.instruments
        size, values = vocab.size, vocab.values()
        family = {name: vocab.family_of(name) for name in ("note", "duration", "instrument", "hit", "velocity")}
        code = {name: index for index, name in enumerate(PHASES)}
        sep, eos = np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)
        sep[Vocab.SEP], eos[Vocab.EOS] = True, True
        group_start = family["instrument"] | family["hit"] if config.instruments else family["note"]
        follows = {  # phase → tokens it allows, before the instrument and lowest-pitch rules
            "start": group_start | sep,
            "after_sep": family["duration"],
            "after_gap": group_start,
            "after_full_gap": group_start | sep,
            "after_instrument": family["note"],
            "after_note": family["duration"] | family["velocity"],
            "after_note_velocity": family["duration"],
            "after_note_duration": family["note"] | family["instrument"] | family["hit"] | sep,
            "after_hit": family["hit"] | family["velocity"] | sep,
            "after_hit_velocity": family["hit"] | sep,
            "end": np.zeros(size, dtype=bool),
        }
        self.phase_mask = np.stack([follows[name] for name in PHASES])  # (P, V)
        self.ends = np.zeros(len(PHASES), dtype=bool)  # phases after which `<eos>` may come
        self.ends[[code["after_note_duration"], code["after_hit"], code["after_hit_velocity"]]] = True
        self.eos = eos

        # an instrument's run comes after those of lower programs, and none after the drums
        instrument_levels = np.arange(DRUMS + 1)
        self.instrument_mask = ~family["instrument"] | (values + 1 > instrument_levels[:, None])  # (DRUMS + 1, V)
        # notes of a run, and hits of the drum run, go down in pitch (or repeat it, where unisons are kept)
        highest = np.arange(NO_LOWEST + 1) + (not config.merge_unisons)  # (L,) exclusive bound on the next pitch
        highest[NO_LOWEST] = NUM_PITCHES
        below = values < highest[:, None]  # (L, V)
        hits_below = values < np.arange(NO_LOWEST + 1)[:, None]
        hits_below[NO_LOWEST] = True
        self.lowest_mask = np.stack([np.where(family["note"], below, True),  # in a pitched run (or none)
                                     np.where(family["note"], below, True) & np.where(family["hit"], hits_below, True)])

        next_phase = np.full((len(PHASES), size), code["end"], dtype=np.int64)
        next_lowest = np.full((len(PHASES), size), KEEP, dtype=np.int64)
        next_instrument = np.full((len(PHASES), size), KEEP, dtype=np.int64)
        feature_off = np.zeros((len(PHASES), size), dtype=bool)  # tokens whose `instruments` feature is 0
        advance = np.zeros((len(PHASES), size), dtype=np.int64)  # steps a token moves time on
        next_phase[:, Vocab.SOS] = code["start"]
        next_lowest[:, Vocab.SOS], next_instrument[:, Vocab.SOS] = NO_LOWEST, NO_INSTRUMENT
        next_phase[:, Vocab.SEP] = code["after_sep"]
        next_phase[:, Vocab.PAD] = np.arange(len(PHASES))  # padding changes nothing
        feature_off[:, [Vocab.PAD, Vocab.SOS, Vocab.EOS, Vocab.SEP]] = True
        durations = family["duration"]
        next_phase[:, durations] = code["after_note_duration"]
        gap = code["after_sep"]
        next_phase[gap, durations] = np.where(values[durations] == vocab.max_duration, code["after_full_gap"],
                                              code["after_gap"])
        next_lowest[gap, durations], next_instrument[gap, durations] = NO_LOWEST, NO_INSTRUMENT
        feature_off[gap, durations] = True
        advance[gap, durations] = values[durations]
        next_phase[:, family["note"]] = code["after_note"]
        next_lowest[:, family["note"]] = values[family["note"]]
        next_phase[:, family["instrument"]] = code["after_instrument"]
        next_lowest[:, family["instrument"]] = NO_LOWEST
        next_instrument[:, family["instrument"]] = values[family["instrument"]] + 1
        next_phase[:, family["hit"]] = code["after_hit"]
        next_lowest[:, family["hit"]], next_instrument[:, family["hit"]] = values[family["hit"]], DRUMS
        next_phase[:, family["velocity"]] = code["after_note_velocity"]
        next_phase[code["after_hit"], family["velocity"]] = code["after_hit_velocity"]
        self.next_phase, self.next_lowest, self.next_instrument = next_phase, next_lowest, next_instrument
        self.feature_off, self.advance = feature_off, advance
        self.start = (code["start"], NO_LOWEST, NO_INSTRUMENT)  # the state after `<sos>`
        self.completes = np.zeros(len(PHASES), dtype=bool)  # phases entered by the token that completes a note
        self.completes[[code["after_note_duration"], code["after_hit"]]] = True

    def allowed(self, state: tuple[int, int, int], allow_end: bool = True) -> np.ndarray:
        """(V,) bool: the tokens that may follow a lane in `state` (phase, lowest, instrument)."""
        phase, lowest, instrument = state
        mask = self.phase_mask[phase] & self.instrument_mask[instrument] & self.lowest_mask[int(instrument == DRUMS), lowest]
        return mask | (self.eos & allow_end & self.ends[phase])

    def feed(self, state: tuple[int, int, int], token: int) -> tuple[int, int, int]:
        """The state after `token`."""
        phase, lowest, instrument = state
        new_lowest, new_instrument = self.next_lowest[phase, token], self.next_instrument[phase, token]
        return (int(self.next_phase[phase, token]), lowest if new_lowest == KEEP else int(new_lowest),
                instrument if new_instrument == KEEP else int(new_instrument))

    def state_after(self, tokens: np.ndarray) -> tuple[int, int, int]:
        """The state after a sequence that starts with `<sos>`."""
        state = self.start
        for token in np.asarray(tokens).tolist():
            state = self.feed(state, token)
        return state

    def states(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """(B, 4) each sequence's state for a lane: (phase, lowest, instrument) after it, and the pitch of its last
        note token (the note a duration completes), −1 if none."""
        notes = self.vocab.ids_of("note")
        rows = []
        for tokens in sequences:
            tokens = np.asarray(tokens)
            note_tokens = tokens[(tokens >= notes.start) & (tokens < notes.stop)]
            pending = int(note_tokens[-1]) - notes.start if note_tokens.size else -1
            rows.append((*self.state_after(tokens), pending))
        return np.array(rows, dtype=np.int64).reshape(-1, 4)

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None (a leading `<sos>` is the start)."""
        state = self.start
        for index, token in enumerate(np.asarray(tokens).tolist()):
            if index == 0 and token == Vocab.SOS:
                continue
            if not self.allowed(state)[token]:
                return index
            state = self.feed(state, token)
        return None

    def instrument_features(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) the `instruments` feature of each token of a sequence that starts with `<sos>`."""
        state, features = self.start, np.zeros(len(tokens), dtype=np.int64)
        for index, token in enumerate(np.asarray(tokens).tolist()):
            off = self.feature_off[state[0], token]
            state = self.feed(state, token)
            features[index] = 0 if off else state[2]
        return features

    def on(self, device: torch.device) -> DeviceGrammar:
        return DeviceGrammar(self, device)


class DeviceGrammar:
    """The tables of a `GrammarTables` on a torch device, for a batch of lanes (a `LaneGrammar`): a lane's state is
    (phase, lowest, instrument, pending pitch), see `GrammarTables.states`."""

    def __init__(self, tables: GrammarTables, device: torch.device) -> None:
        import torch

        self.tables = tables
        as_tensor = lambda array: torch.as_tensor(array, device=device)  # noqa: E731
        self.phase_mask, self.instrument_mask = as_tensor(tables.phase_mask), as_tensor(tables.instrument_mask)
        self.lowest_mask, self.ends, self.eos = as_tensor(tables.lowest_mask), as_tensor(tables.ends), as_tensor(tables.eos)
        self.next_phase, self.next_lowest = as_tensor(tables.next_phase), as_tensor(tables.next_lowest)
        self.next_instrument, self.feature_off = as_tensor(tables.next_instrument), as_tensor(tables.feature_off)
        self.advance, self.completes = as_tensor(tables.advance), as_tensor(tables.completes)
        vocab = tables.vocab
        self.values = as_tensor(vocab.values())
        self.is_note, self.is_hit = as_tensor(vocab.family_of("note")), as_tensor(vocab.family_of("hit"))
        self.instruments = tables.instruments

    def allowed(self, state: torch.Tensor, allow_end: bool) -> torch.Tensor:
        """(B, V) bool: the tokens each lane may take next."""
        phase, lowest, instrument = state[:, 0], state[:, 1], state[:, 2]
        mask = self.phase_mask[phase] & self.instrument_mask[instrument] & self.lowest_mask[(instrument == DRUMS).long(), lowest]
        if allow_end:
            mask = mask | (self.eos & self.ends[phase].unsqueeze(1))
        return mask

    def feed(self, state: torch.Tensor, tokens: torch.Tensor) -> Fed:
        """Each lane's state after `tokens` (B,), the steps each token moves time on, its `instruments` feature and
        the note it completes (a note's duration, a drum hit)."""
        import torch

        phase, lowest, instrument, pending = state.unbind(1)
        new_lowest, new_instrument = self.next_lowest[phase, tokens], self.next_instrument[phase, tokens]
        lowest = lowest.where(new_lowest == KEEP, new_lowest)
        instrument_after = instrument.where(new_instrument == KEEP, new_instrument)
        value, hit = self.values[tokens], self.is_hit[tokens]
        pending = value.where(self.is_note[tokens], pending)
        next_phase, advance = self.next_phase[phase, tokens], self.advance[phase, tokens]
        completes = self.completes[next_phase]
        pitch = value.where(hit, pending).where(completes, -1)
        length = torch.ones_like(value).where(hit, value)
        program = instrument_after - 1 if self.instruments else torch.zeros_like(instrument_after)
        notes = torch.stack([advance, pitch, length, program], dim=1).unsqueeze(1)  # (B, 1, NOTE_FIELDS)
        features = {}
        if self.instruments:
            features["instruments"] = instrument_after.where(~self.feature_off[phase, tokens], 0)
        return Fed(torch.stack([next_phase, lowest, instrument_after, pending], dim=1), advance, advance, features,
                   notes)
