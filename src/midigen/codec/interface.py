"""The `Tokenizer` protocol: everything the rest of midigen may ask of an encoding.

Callers never compute token ids: they ask the tokenizer for its vocabulary's families (`vocab.ids_of("note")`), the
padding id, the grammar that generation enforces, which tokens move under transposition, and the named features
each token carries. A tokenizer is built from its config by `midigen.codec.registry.load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import symusic

from midigen.codec.config import TokenizerConfig, Vocab
from midigen.codec.grammar import Fed
from midigen.codec.midi_io import NoteTable
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import EncodedFile, TokenSequence

if TYPE_CHECKING:  # encoding never loads torch; only generation puts a grammar on a device
    import torch


class LaneGrammar(Protocol):
    """A grammar's tables on a torch device, stepping a batch of lanes at once; states are (B, S) long tensors."""

    def allowed(self, state: torch.Tensor, allow_end: bool) -> torch.Tensor:
        """(B, V) bool: the tokens each lane may take next (`<eos>` only where `allow_end`)."""
        ...

    def feed(self, state: torch.Tensor, tokens: torch.Tensor) -> Fed:
        """Each lane's state after its token (B,), with the token's timing, features and completed notes."""
        ...


class Grammar(Protocol):
    """Which tokens may come next, so that every generated sequence decodes."""

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None (a leading `<sos>` is the start)."""
        ...

    def states(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """(B, S) the state after each sequence (each starts with `<sos>`)."""
        ...

    def on(self, device: torch.device) -> LaneGrammar: ...


class Tokenizer(Protocol):
    config: TokenizerConfig
    vocab: Vocab

    @property
    def pad_id(self) -> int: ...

    @property
    def array_dtypes(self) -> dict[str, type[np.generic]]:
        """The arrays a token store keeps per token (`tokens`, `steps`, then the features), and their types."""
        ...

    @property
    def feature_sizes(self) -> dict[str, int | None]:
        """The features each token carries and how many values each takes (None: unbounded, e.g. bar numbers)."""
        ...

    @property
    def grammar(self) -> Grammar: ...

    def encode(self, source: str | Path | bytes | symusic.Score | NoteTable) -> TokenSequence: ...

    def encode_files(self, tables: Sequence[NoteTable]) -> list[EncodedFile]:
        """Encode several files together (cheaper per file than one at a time); raises `BadMidiError` naming the
        first file that cannot be encoded."""
        ...

    def with_positions(self, tokens: np.ndarray, grid: BarGrid) -> TokenSequence:
        """A grammatical sequence starting with `<sos>`, with the steps and features its tokens imply in `grid`."""
        ...

    def decode(self, sequence: TokenSequence | np.ndarray, tempos: Sequence[tuple[int, float]] = (),
               grid: BarGrid | None = None) -> symusic.Score:
        """Tokens → MIDI; `tempos` are (step, quarter notes per minute), the config's tempo if empty."""
        ...

    def sounding(self) -> np.ndarray:
        """(V,) bool: the tokens that start a sounding note (notes and drum hits)."""
        ...

    def note_counts(self) -> np.ndarray:
        """(V,) int64: how many notes and drum hits each token starts (more than one for a merged token)."""
        ...

    def transposable_pitches(self) -> np.ndarray:
        """(V,) the pitch of each token that moves under transposition (id + shift is the same token family at
        pitch + shift), −1 for every other token."""
        ...

    def token_pitches(self) -> np.ndarray:
        """(V,) the pitch of each token that is one pitched note event and nothing else (a note; a MIDI-like
        note-off), −1 for every other token (drum hits, merged tokens...)."""
        ...

    def token_lookups(self) -> dict[str, np.ndarray]:
        """The features derived from a token's id alone, never stored: name → (V,) int64 value of each token (0 for
        tokens without it), e.g. the pitch class and octave of pitched notes; the model looks them up itself."""
        ...

    def token_value_counts(self) -> dict[str, np.ndarray]:
        """For each of `token_lookups`' features: (V, values) float32, how many of each token's notes take each value;
        a token without notes counts one 0. A base token's row is its lookup value, one-hot; a merged token's counts
        every note it holds."""
        ...

    def instrument_tokens(self, instruments: Sequence[int]) -> np.ndarray:
        """(V,) bool: the tokens a generation restricted to `instruments` (programs, 128 for drums) may use."""
        ...

    def token_types(self) -> dict[str, np.ndarray]:
        """Named disjoint (V,) bool masks of the token types losses are reported by (`<sos>`/`<eos>` in none)."""
        ...
