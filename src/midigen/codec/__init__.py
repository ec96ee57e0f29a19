"""MIDI ⇄ tokens: the `Tokenizer` interface, its registry (`load_tokenizer`), the seed codec (single stream or
multi-track) and MidiTok's tokenizations (`MiditokTokenizer`)."""

from midigen.codec.bpe import BpeTokenizer
from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab
from midigen.codec.grammar import GrammarTables
from midigen.codec.instruments import parse_instruments
from midigen.codec.interface import Tokenizer
from midigen.codec.midi_io import NoteTable, read_notes
from midigen.codec.miditok_kinds import MiditokTokenizer
from midigen.codec.registry import load_tokenizer
from midigen.codec.timing import BarGrid, TimeSignatureChange
from midigen.codec.tokenizer import (
    GAP,
    PositionScore,
    SeedTokenizer,
    SparseScore,
    TokenSequence,
    note_accuracy,
    pitch_name,
    show_position_score,
    show_sparse_score,
)

__all__ = [
    "GAP",
    "NUM_PITCHES",
    "BarGrid",
    "BpeTokenizer",
    "GrammarTables",
    "MiditokTokenizer",
    "NoteTable",
    "PositionScore",
    "SeedTokenizer",
    "SparseScore",
    "TimeSignatureChange",
    "Tokenizer",
    "TokenSequence",
    "TokenizerConfig",
    "Vocab",
    "load_tokenizer",
    "note_accuracy",
    "parse_instruments",
    "pitch_name",
    "read_notes",
    "show_position_score",
    "show_sparse_score",
]
