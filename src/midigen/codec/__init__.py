"""MIDI ⇄ tokens: the seed's sparse → position → index score encoding."""

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab
from midigen.codec.midi_io import MidiNotes, read_notes
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
    "MidiNotes",
    "PositionScore",
    "SeedTokenizer",
    "SparseScore",
    "TimeSignatureChange",
    "TokenSequence",
    "TokenizerConfig",
    "Vocab",
    "note_accuracy",
    "pitch_name",
    "read_notes",
    "show_position_score",
    "show_sparse_score",
]
