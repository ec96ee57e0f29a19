"""Byte-pair encoding across timesteps, on top of a base tokenizer (the seed codec or a MidiTok kind).

A merged token stands for a sequence of base tokens (`TokenizerConfig.merges`, learned by `midigen.data.bpe`); its
id follows the base vocabulary. Merges run over a song's whole body (everything between `<sos>` and `<eos>`; each
bar of it with `merges_within_bars`), so they cross onset groups and bars: a frequent chord with its gap, or a bar's rhythm, becomes one token. A merged
token sits where its first base token sits: it takes that token's step and features. Decoding expands the merged
tokens to base tokens, so it is exactly the base tokenizer's.

The grammar (`BpeGrammar`) allows a merged token when its whole base sequence is allowed from the lane's state. The
seed grammar's state is (phase, lowest pitch of the current run, instrument); folding a base sequence from a phase
fixes the phases it goes through, and the lowest pitch and instrument matter only until a base token sets them. So
each token's rule factorises over the initial state, for each initial phase and whether the instrument is the drums:
allowed = valid[drums, phase, token] & (instrument <= instrument_max[phase, token])
          & (lowest >= lowest_min[drums, phase, token]).
The base tokens follow the same rule (a sequence of one), so one set of tables serves the whole vocabulary, on
numpy and on a torch device.

A MidiTok kind's grammar state holds the clock, the bar and the notes on, which no table over initial states can
enumerate; there the merged tokens' base runs are fed through the base grammar's lanes for every lane and merged
token at once, one base position at a time (`FoldingGrammar`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import symusic

from midigen.codec.config import PAD_ID, TokenFamilies, TokenizerConfig, Vocab, check_merges
from midigen.codec.grammar import DRUMS, KEEP, NO_INSTRUMENT, NOTE_FIELDS, PHASES, Fed, GrammarTables
from midigen.codec.midi_io import NoteTable
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import EncodedFile, TokenSequence
from midigen.errors import MidigenError

if TYPE_CHECKING:  # encoding never loads torch; only generation puts a grammar on a device
    import torch

    from midigen.codec.interface import Grammar, LaneGrammar, Tokenizer
    from midigen.codec.miditok_kinds import MiditokVocab

TEXT_BASE = 0xF0000  # base token id → one character from U+F0000 on (Unicode's private use planes: any uint16 id)
UNMERGED = (Vocab.PAD, Vocab.SOS, Vocab.EOS)  # never inside a merged token: merges run between them
PENDING = -2  # in a merged token's note rows: the pitch of the note the lane awaits the duration of


def base_text(tokens: np.ndarray) -> str:
    """Base token ids as text, one character each (what the Hugging Face BPE model reads)."""
    return "".join(map(chr, (np.asarray(tokens, dtype=np.int64) + TEXT_BASE).tolist()))


def expansions(merges: Sequence[tuple[int, int]], base_size: int) -> list[tuple[int, ...]]:
    """The base-token sequence of every token, base tokens first (each itself), then each merged token's."""
    sequences: list[tuple[int, ...]] = [(token,) for token in range(base_size)]
    for left, right in merges:
        sequences.append(sequences[left] + sequences[right])
    return sequences


class BpeTokenizer:
    """A base tokenizer with byte-pair merges: `encode` merges the base tokens, `decode` expands them back."""

    def __init__(self, config: TokenizerConfig) -> None:
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import models

        from midigen.codec.registry import load_tokenizer

        if not config.merges:
            raise MidigenError("a byte-pair tokenizer needs merges (learn them with `midigen tokenizer train`)")
        self.config = config
        self.base: Tokenizer = load_tokenizer(replace(config, merges=()))
        base_size = self.base.vocab.size
        check_merges(config.merges, base_size)
        self.vocab = config.vocab if config.kind == "seed" else MergedVocab(self.base.vocab, len(config.merges))
        sequences = expansions(config.merges, base_size)
        texts = [base_text(np.array(sequence)) for sequence in sequences]
        if len(set(texts)) < len(texts):
            repeated = next(i for i, text in enumerate(texts) if texts.index(text) != i)
            raise MidigenError(f"merged token {repeated} repeats an earlier token's base tokens")
        if any(set(sequence) & set(UNMERGED) for sequence in sequences[base_size:]):
            raise MidigenError("a merge joins <pad>, <sos> or <eos>, which merged tokens never hold")
        self.lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)  # (V,)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # (V + 1,) where each token's base run begins
        self.flat = np.concatenate([np.array(sequence, dtype=np.int64) for sequence in sequences])  # (sum lengths,)
        self.owners = np.repeat(np.arange(self.vocab.size), self.lengths)  # (sum lengths,) the token of each base token
        model = models.BPE(vocab={text: token for token, text in enumerate(texts)},
                           merges=[(texts[left], texts[right]) for left, right in config.merges],
                           cache_capacity=0)  # a whole song is one word: caching songs would only hold memory
        self.encoder = HfTokenizer(model)

    # ---- what the rest of midigen asks (`midigen.codec.interface.Tokenizer`) -------------------
    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def array_dtypes(self) -> dict[str, type[np.generic]]:
        return self.base.array_dtypes

    @property
    def feature_sizes(self) -> dict[str, int | None]:
        return self.base.feature_sizes

    @cached_property
    def grammar(self) -> BpeGrammar | FoldingGrammar:
        base = self.base.grammar
        return BpeGrammar(base, self) if isinstance(base, GrammarTables) else FoldingGrammar(base, self)

    def sounding(self) -> np.ndarray:
        """(V,) bool: the tokens that hold a note or drum hit."""
        return self.any_of(self.base.sounding())

    def note_counts(self) -> np.ndarray:
        """(V,) int64: the notes and drum hits among each token's base tokens."""
        return np.add.reduceat(self.base.note_counts()[self.flat], self.starts[:-1])

    def transposable_pitches(self) -> np.ndarray:
        """All −1: a merge holds its notes at their pitches, and moving only the unmerged notes would put parts of
        a song in different keys, so transposition moves nothing."""
        return np.full(self.vocab.size, -1, dtype=np.int64)

    def token_pitches(self) -> np.ndarray:
        """The base note tokens' pitches; −1 for every merged token."""
        pitches = np.full(self.vocab.size, -1, dtype=np.int64)
        pitches[: self.base.vocab.size] = self.base.token_pitches()
        return pitches

    def token_lookups(self) -> dict[str, np.ndarray]:
        """The base tokenizer's lookups; a merged token takes the value of its first base token that has one (its
        first note)."""
        lookups = {}
        for name, values in self.base.token_lookups().items():
            flat = np.asarray(values, dtype=np.int64)[self.flat]  # (sum lengths,)
            valued = np.flatnonzero(flat)  # in order, so each token's first is its first note's
            tokens, first = np.unique(self.owners[valued], return_index=True)
            lookup = np.zeros(self.vocab.size, dtype=np.int64)
            lookup[tokens] = flat[valued[first]]
            lookups[name] = lookup
        return lookups

    def token_value_counts(self) -> dict[str, np.ndarray]:
        """Every note of a merged token counted at its value; a token without notes counts one 0."""
        counts = {}
        for name, values in self.base.token_lookups().items():
            flat = np.asarray(values, dtype=np.int64)[self.flat]  # (sum lengths,)
            table = np.zeros((self.vocab.size, int(flat.max()) + 1), dtype=np.float32)  # (V, values)
            np.add.at(table, (self.owners[flat > 0], flat[flat > 0]), 1)
            table[table.sum(axis=1) == 0, 0] = 1
            counts[name] = table
        return counts

    def instrument_tokens(self, instruments: Sequence[int]) -> np.ndarray:
        """(V,) bool: the tokens all of whose base tokens the base tokenizer allows."""
        return self.all_of(self.base.instrument_tokens(instruments))

    def token_types(self) -> dict[str, np.ndarray]:
        """The base tokenizer's types, and `merged` for the merged tokens."""
        base_size = self.base.vocab.size
        types = {name: np.concatenate([mask, np.zeros(self.vocab.size - base_size, dtype=bool)])
                 for name, mask in self.base.token_types().items()}
        types["merged"] = np.arange(self.vocab.size) >= base_size
        return types

    def any_of(self, base_mask: np.ndarray) -> np.ndarray:
        """(V,) bool: the tokens with at least one base token in `base_mask` (base V,)."""
        return np.logical_or.reduceat(np.asarray(base_mask)[self.flat], self.starts[:-1])

    def all_of(self, base_mask: np.ndarray) -> np.ndarray:
        """(V,) bool: the tokens whose base tokens are all in `base_mask` (base V,)."""
        return np.logical_and.reduceat(np.asarray(base_mask)[self.flat], self.starts[:-1])

    # ---- encode -------------------------------------------------------------------------------
    def encode(self, source: str | Path | bytes | symusic.Score | NoteTable) -> TokenSequence:
        return self.merged(self.base.encode(source))

    def encode_files(self, tables: Sequence[NoteTable]) -> list[EncodedFile]:
        return [replace(file, sequence=self.merged(file.sequence)) for file in self.base.encode_files(tables)]

    def merged(self, sequence: TokenSequence) -> TokenSequence:
        """A base sequence with the merges applied; each merged token takes its first base token's step and
        features."""
        tokens, firsts = self.apply_merges(np.asarray(sequence.tokens, dtype=np.int64), sequence.bars)
        return TokenSequence(tokens, sequence.steps[firsts], {name: array[firsts] for name, array in
                                                              sequence.features.items()}, sequence.grid)

    def apply_merges(self, tokens: np.ndarray, bars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Base tokens (and their bars) → merged tokens, and where each begins among the base tokens. The merges
        run over each stretch between `<sos>`, `<eos>` and padding, which stay tokens of their own (with
        `merges_within_bars`, over each bar of it)."""
        apart = np.flatnonzero(np.isin(tokens, UNMERGED))
        bounds = np.concatenate([[-1], apart, [tokens.size]])
        ids, firsts = [], []
        for before, after in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            if after > before + 1:
                stretch = np.arange(before + 1, after)
                pieces = np.split(stretch, np.flatnonzero(np.diff(bars[stretch])) + 1) \
                    if self.config.merges_within_bars else [stretch]
                for piece in pieces:
                    encoding = self.encoder.encode(base_text(tokens[piece]))
                    ids.append(np.array(encoding.ids, dtype=np.int64))
                    firsts.append(piece[0] + np.array([start for start, _ in encoding.offsets], dtype=np.int64))
            if after < tokens.size:
                ids.append(tokens[after : after + 1])
                firsts.append(np.array([after], dtype=np.int64))
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(ids), np.concatenate(firsts)

    def expand(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merged tokens → base tokens, and where each merged token's base run begins among them."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and ((tokens < 0) | (tokens >= self.vocab.size)).any():
            bad = int(tokens[(tokens < 0) | (tokens >= self.vocab.size)][0])
            raise MidigenError(f"token id {bad} is outside the vocabulary (size {self.vocab.size})")
        lengths = self.lengths[tokens]
        firsts = np.cumsum(lengths) - lengths
        within = np.arange(int(lengths.sum())) - np.repeat(firsts, lengths)
        return self.flat[np.repeat(self.starts[tokens], lengths) + within], firsts

    # ---- positions ----------------------------------------------------------------------------
    def with_positions(self, tokens: np.ndarray, grid: BarGrid) -> TokenSequence:
        base_tokens, firsts = self.expand(tokens)
        placed = self.base.with_positions(base_tokens, grid)
        return TokenSequence(np.asarray(tokens, dtype=np.int64), placed.steps[firsts],
                             {name: array[firsts] for name, array in placed.features.items()}, grid)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, sequence: TokenSequence | np.ndarray | list[int], tempos: Sequence[tuple[int, float]] = (),
               grid: BarGrid | None = None) -> symusic.Score:
        """The base tokenizer's decoding of the expanded tokens (time signatures as it finds them: from `grid`, the
        sequence's own grid, or its positions)."""
        cfg = self.config
        if isinstance(sequence, TokenSequence):
            tokens = sequence.tokens
            if grid is None:
                grid = sequence.grid or BarGrid.from_positions(sequence.steps, sequence.bars, sequence.beats,
                                                               cfg.steps_per_quarter, cfg.beat_positions)
        else:
            tokens = np.asarray(sequence, dtype=np.int64)
        return self.base.decode(self.expand(tokens)[0], tempos, grid)


@dataclass
class FoldedTables:
    """Every token's base run folded from every phase (see the module doc); `drums` axes say whether the lane's
    instrument before the token is the drums. KEEP (−1) in a `next_*` or note instrument: the lane's own value."""

    valid: np.ndarray  # (2, P, V) bool: the run's phases and every rule that does not depend on the initial state
    instrument_max: np.ndarray  # (P, V) the highest initial instrument the run allows
    lowest_min: np.ndarray  # (2, P, V) the lowest initial "lowest pitch" the run allows
    next_phase: np.ndarray  # (P, V)
    next_lowest: np.ndarray  # (P, V)
    next_instrument: np.ndarray  # (P, V)
    next_pending: np.ndarray  # (V,) the pitch of the run's last note token
    lead: np.ndarray  # (P, V) the first base token's advance: where the token sits
    advance: np.ndarray  # (P, V) the run's whole advance
    feature_off: np.ndarray  # (P, V) bool: the first base token's `instruments` feature is 0
    feature_instrument: np.ndarray  # (P, V) the first base token's `instruments` feature otherwise
    note_offset: np.ndarray  # (P, V, N) each completed note's onset, from the step before the token
    note_pitch: np.ndarray  # (P, V, N) −1: no note; PENDING: the lane's awaited note
    note_length: np.ndarray  # (P, V, N)
    note_instrument: np.ndarray  # (P, V, N) the lane's instrument component when the note completes


def fold(base: GrammarTables, sequences: list[tuple[int, ...]]) -> FoldedTables:
    """Fold every base run from every phase at once, the initial lowest pitch and instrument left symbolic (KEEP)
    until a base token sets them; each step works on the runs long enough to reach it."""
    vocab = base.vocab
    # the base rules as bounds: an instrument token allows instruments up to its program (the runs come in program
    # order), a note (or a drum hit, in the drum run) allows a lowest pitch from just above it
    instrument_max = base.instrument_mask.shape[0] - 1 - np.argmax(base.instrument_mask[::-1], axis=0)  # (V_base,)
    lowest_min = np.argmax(base.lowest_mask, axis=1)  # (2, V_base)
    assert (base.instrument_mask == (np.arange(base.instrument_mask.shape[0])[:, None] <= instrument_max)).all()
    assert (base.lowest_mask == (np.arange(base.lowest_mask.shape[1])[None, :, None] >= lowest_min[:, None])).all()
    values, is_note, is_hit = vocab.values(), vocab.family_of("note"), vocab.family_of("hit")
    may_complete = is_hit | vocab.family_of("duration")

    phases, size = len(PHASES), len(sequences)
    lengths = np.array([len(sequence) for sequence in sequences])  # (V,)
    runs = np.zeros((size, int(lengths.max())), dtype=np.int64)  # (V, L) padded
    for token, sequence in enumerate(sequences):
        runs[token, : len(sequence)] = sequence
    shape = (2, phases, size)  # (drums before, phase, token)
    drums_before = np.arange(2)[:, None, None].astype(bool)
    phase = np.broadcast_to(np.arange(phases)[None, :, None], shape).copy()
    lowest, instrument = np.full(shape, KEEP), np.full(shape, KEEP)
    valid = np.ones(shape, dtype=bool)
    allowed_instruments, allowed_lowest = np.full(shape, DRUMS), np.zeros(shape, dtype=np.int64)
    advance = np.zeros(shape, dtype=np.int64)
    pending = np.full(size, PENDING)
    lead = base.advance[:, runs[:, 0]]  # (P, V)
    feature_off = base.feature_off[:, runs[:, 0]]
    feature_instrument = base.next_instrument[:, runs[:, 0]]
    width = max(1, int(max(may_complete[list(sequence)].sum() for sequence in sequences)))
    notes = np.full((NOTE_FIELDS, phases, size, width), -1, dtype=np.int64)  # (offset, pitch, length, instrument)
    counts = np.zeros((phases, size), dtype=np.int64)
    for position in range(runs.shape[1]):
        live = np.flatnonzero(lengths > position)  # (n,) the runs that reach this position
        token = runs[live, position]  # (n,)
        state_phase, state_lowest, state_instrument = phase[..., live], lowest[..., live], instrument[..., live]
        symbolic_instrument, symbolic_lowest = state_instrument == KEEP, state_lowest == KEEP
        drums = np.where(symbolic_instrument, drums_before, state_instrument == DRUMS).astype(np.int64)
        concrete_ok = (symbolic_instrument | base.instrument_mask[state_instrument.clip(0), token]) & \
                      (symbolic_lowest | base.lowest_mask[drums, state_lowest.clip(0), token])
        valid[..., live] &= base.phase_mask[state_phase, token] & concrete_ok
        allowed_instruments[..., live] = np.where(symbolic_instrument, np.minimum(allowed_instruments[..., live],
                                                                                  instrument_max[token]),
                                                  allowed_instruments[..., live])
        allowed_lowest[..., live] = np.where(symbolic_lowest, np.maximum(allowed_lowest[..., live],
                                                                         lowest_min[drums, token]),
                                             allowed_lowest[..., live])
        new_lowest, new_instrument = base.next_lowest[state_phase, token], base.next_instrument[state_phase, token]
        next_phase = base.next_phase[state_phase, token]
        advance[..., live] += base.advance[state_phase, token]
        instrument[..., live] = np.where(new_instrument != KEEP, new_instrument, state_instrument)
        lowest[..., live] = np.where(new_lowest != KEEP, new_lowest, state_lowest)
        phase[..., live] = next_phase
        # a note completes on its duration (its pitch that of the run's last note token, or the lane's awaited one)
        # or on a drum hit; rules and notes alike come out the same whatever the drums axis, so notes read axis 0
        completes = base.completes[next_phase[0]]  # (P, n)
        rows, columns = np.nonzero(completes)
        tokens_here = live[columns]
        slots = counts[rows, tokens_here]
        pitch = np.where(is_hit[token], values[token], pending[live])[columns]
        notes[:, rows, tokens_here, slots] = np.stack([advance[0][rows, tokens_here], pitch,
                                                      np.where(is_hit[token], 1, values[token])[columns],
                                                      instrument[0][rows, tokens_here]])
        counts[rows, tokens_here] += 1
        pending[live] = np.where(is_note[token], values[token], pending[live])
    used = max(1, int(counts.max()))
    offset, pitch, length, note_instrument = notes[..., :used]
    return FoldedTables(valid, allowed_instruments[0], allowed_lowest, phase[0], lowest[0], instrument[0],
                        np.where(pending == PENDING, KEEP, pending), lead, advance[0], feature_off, feature_instrument,
                        offset, pitch, length, note_instrument)


class BpeGrammar:
    """The seed grammar over merged tokens (a `Grammar`): a lane's state is the base grammar's (phase, lowest,
    instrument, pending pitch)."""

    def __init__(self, base: GrammarTables, tokenizer: BpeTokenizer) -> None:
        self.base, self.tokenizer = base, tokenizer
        self.instruments = base.instruments
        self.tables = fold(base, expansions(tokenizer.config.merges, tokenizer.base.vocab.size))
        self.eos = np.arange(tokenizer.vocab.size) == Vocab.EOS
        self.ends = base.ends

    def allowed(self, state: tuple[int, int, int], allow_end: bool = True) -> np.ndarray:
        """(V,) bool: the tokens that may follow a lane in `state` (phase, lowest, instrument)."""
        phase, lowest, instrument = state
        tables, drums = self.tables, int(instrument == DRUMS)
        mask = (tables.valid[drums, phase] & (instrument <= tables.instrument_max[phase])
                & (lowest >= tables.lowest_min[drums, phase]))
        return mask | (self.eos & allow_end & self.ends[phase])

    def feed(self, state: tuple[int, int, int], token: int) -> tuple[int, int, int]:
        """The state after `token`."""
        phase, lowest, instrument = state
        new_lowest, new_instrument = self.tables.next_lowest[phase, token], self.tables.next_instrument[phase, token]
        return (int(self.tables.next_phase[phase, token]), lowest if new_lowest == KEEP else int(new_lowest),
                instrument if new_instrument == KEEP else int(new_instrument))

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None (a leading `<sos>` is the start)."""
        state = self.base.start
        for index, token in enumerate(np.asarray(tokens).tolist()):
            if index == 0 and token == Vocab.SOS:
                continue
            if not 0 <= token < self.tokenizer.vocab.size or not self.allowed(state)[token]:
                return index
            state = self.feed(state, token)
        return None

    def states(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """(B, 4) the base grammar's state after each sequence's base tokens."""
        return self.base.states([self.tokenizer.expand(tokens)[0] for tokens in sequences])

    def on(self, device: torch.device) -> BpeLaneGrammar:
        return BpeLaneGrammar(self, device)


class BpeLaneGrammar:
    """A `BpeGrammar`'s tables on a torch device, for a batch of lanes (a `LaneGrammar`)."""

    def __init__(self, grammar: BpeGrammar, device: torch.device) -> None:
        import torch

        tables = grammar.tables
        self.tables = {name: torch.as_tensor(value, device=device) for name, value in vars(tables).items()}
        self.eos, self.ends = torch.as_tensor(grammar.eos, device=device), torch.as_tensor(grammar.ends, device=device)
        self.instruments = grammar.instruments

    def allowed(self, state: torch.Tensor, allow_end: bool) -> torch.Tensor:
        """(B, V) bool: the tokens each lane may take next."""
        phase, lowest, instrument = state[:, 0], state[:, 1], state[:, 2]
        drums, t = (instrument == DRUMS).long(), self.tables
        mask = (t["valid"][drums, phase] & (instrument.unsqueeze(1) <= t["instrument_max"][phase])
                & (lowest.unsqueeze(1) >= t["lowest_min"][drums, phase]))
        if allow_end:
            mask = mask | (self.eos & self.ends[phase].unsqueeze(1))
        return mask

    def feed(self, state: torch.Tensor, tokens: torch.Tensor) -> Fed:
        """Each lane's state after `tokens` (B,), where the token sits, how far it moves time on, its `instruments`
        feature and every note its base run completes."""
        import torch

        t = self.tables
        phase, lowest, instrument, pending = state.unbind(1)
        kept = lambda new, old: old.where(new == KEEP, new)  # noqa: E731
        next_state = torch.stack([t["next_phase"][phase, tokens], kept(t["next_lowest"][phase, tokens], lowest),
                                  kept(t["next_instrument"][phase, tokens], instrument),
                                  kept(t["next_pending"][tokens], pending)], dim=1)
        pitch = t["note_pitch"][phase, tokens]  # (B, N)
        pitch = pitch.where(pitch != PENDING, pending.unsqueeze(1))
        note_instrument = kept(t["note_instrument"][phase, tokens], instrument.unsqueeze(1))
        program = note_instrument - 1 if self.instruments else torch.zeros_like(note_instrument)
        notes = torch.stack([t["note_offset"][phase, tokens], pitch, t["note_length"][phase, tokens], program], dim=2)
        assert notes.shape[2] == NOTE_FIELDS
        features = {}
        if self.instruments:
            feature = kept(t["feature_instrument"][phase, tokens], instrument)
            features["instruments"] = feature.where(~t["feature_off"][phase, tokens], NO_INSTRUMENT)
        return Fed(next_state, t["lead"][phase, tokens], t["advance"][phase, tokens], features, notes)


class MergedVocab(TokenFamilies):
    """A MidiTok kind's vocabulary followed by the merged tokens (family `merged`, named `m0..`)."""

    def __init__(self, base: MiditokVocab, merges: int) -> None:
        self.base, self.base_size = base, base.size
        self.size = base.size + merges
        self.families = base.families | {"merged": range(base.size, self.size)}

    def values(self) -> np.ndarray:
        """The base tokens' values; 0 for merged tokens."""
        return np.concatenate([self.base.values(), np.zeros(self.size - self.base_size, dtype=np.int64)])

    def names(self) -> list[str]:
        return self.base.names() + [f"m{index}" for index in range(self.size - self.base_size)]

    def describe(self, tokens: Sequence[int] | np.ndarray) -> list[str]:
        names = self.names()
        return [names[int(token)] for token in tokens]


class FoldingGrammar:
    """Any base grammar over merged tokens (a `Grammar`): a merged token is allowed where its base run is, fed
    through the base grammar; a lane's state is the base grammar's."""

    def __init__(self, base: Grammar, tokenizer: BpeTokenizer) -> None:
        self.base, self.tokenizer = base, tokenizer

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None (a leading `<sos>` is the start)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        outside = np.flatnonzero((tokens < 0) | (tokens >= self.tokenizer.vocab.size))
        if outside.size:  # the tokens before the first bad id must pass too
            return self.check(tokens[: outside[0]]) if outside[0] else 0
        base_tokens, firsts = self.tokenizer.expand(tokens)
        broken = self.base.check(base_tokens)
        return None if broken is None else int(np.searchsorted(firsts, broken, side="right") - 1)

    def states(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        return self.base.states([self.tokenizer.expand(tokens)[0] for tokens in sequences])

    def on(self, device: torch.device) -> FoldingLanes:
        return FoldingLanes(self.base.on(device), self.tokenizer, device)


class FoldingLanes:
    """A `FoldingGrammar` for a batch of lanes on a torch device (a `LaneGrammar`)."""

    STATE_BUDGET = 1 << 22  # state values fed at once while folding (memory: MIDI-Like's states are wide)

    def __init__(self, base: LaneGrammar, tokenizer: BpeTokenizer, device: torch.device) -> None:
        import torch

        self.base, self.base_size = base, tokenizer.base.vocab.size
        lengths = tokenizer.lengths  # (V,)
        runs = np.full((lengths.size, int(lengths.max())), PAD_ID, dtype=np.int64)  # (V, L) padded base runs
        runs[np.arange(lengths.size).repeat(lengths), np.arange(lengths.sum()) - np.repeat(tokenizer.starts[:-1],
                                                                                            lengths)] = tokenizer.flat
        self.runs = torch.as_tensor(runs, device=device)
        self.lengths = torch.as_tensor(lengths, device=device)

    def allowed(self, state: torch.Tensor, allow_end: bool) -> torch.Tensor:
        """(B, V) bool: the base grammar's mask for base tokens; a merged token where every base token of its run
        is allowed after the ones before it."""
        import torch

        lanes, width = state.shape
        base_mask = self.base.allowed(state, allow_end)  # (B, V_base)
        merged = torch.arange(self.base_size, self.runs.shape[0], device=state.device)  # (M,)
        chunk = max(1, self.STATE_BUDGET // (lanes * width))
        parts = [self._fold_allowed(state, base_mask, merged[start : start + chunk])
                 for start in range(0, merged.numel(), chunk)]
        return torch.cat([base_mask, *parts], dim=1)

    def _fold_allowed(self, state: torch.Tensor, base_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, len(tokens)) whether each merged token's base run is allowed from each lane's state."""
        import torch

        lanes, count = state.shape[0], tokens.numel()
        runs, lengths = self.runs[tokens], self.lengths[tokens]  # (C, L), (C,)
        ok = base_mask[:, runs[:, 0]].reshape(-1)  # (B·C,) lane-major: the first base token
        states = state.repeat_interleave(count, dim=0)  # (B·C, S)
        steps = runs.repeat(lanes, 1)  # (B·C, L)
        longer = lengths.repeat(lanes)  # (B·C,)
        for position in range(1, int(lengths.max())):
            live = torch.nonzero(ok & (longer > position)).squeeze(1)
            if live.numel() == 0:
                break
            before, after = steps[live, position - 1], steps[live, position]
            fed = self.base.feed(states[live], before).state
            ok[live] = self.base.allowed(fed, False).gather(1, after.unsqueeze(1)).squeeze(1)
            states[live] = fed
        return ok.view(lanes, count)

    def feed(self, state: torch.Tensor, tokens: torch.Tensor) -> Fed:
        """Each lane's state after its token's base run (B,): it sits where its first base token sits, with that
        token's features, moves time on by the run's whole advance and completes every note the run completes
        (onsets from the step before the token)."""
        import torch

        runs, lengths = self.runs[tokens], self.lengths[tokens]  # (B, L), (B,)
        fed = self.base.feed(state, runs[:, 0])
        lead, features, advance, notes = fed.lead, fed.features, fed.advance.clone(), [fed.notes]
        for position in range(1, int(lengths.max())):
            step = self.base.feed(fed.state, runs[:, position])  # padding after a run's end changes nothing
            offsets = step.notes[:, :, :1] + advance[:, None, None]
            notes.append(torch.cat([offsets, step.notes[:, :, 1:]], dim=2))
            advance, fed = advance + step.advance, step
        return Fed(fed.state, lead, advance, features, torch.cat(notes, dim=1))
