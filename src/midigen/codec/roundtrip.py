"""Encode then decode one file: what a user hears is exactly what the encoding keeps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import first_tempo, read_notes, write_midi
from midigen.codec.tokenizer import SeedTokenizer


@dataclass
class RoundtripReport:
    notes_in: int
    notes_out: int
    tokens: int
    merged: int
    clamped: int


def roundtrip_file(source: str | Path, output: str | Path, config: TokenizerConfig | None = None) -> RoundtripReport:
    tokenizer = SeedTokenizer(config)
    notes = read_notes(source, tokenizer.config.keep_drums)
    sparse = tokenizer.sparse_score(notes)
    sequence = tokenizer.index_score(tokenizer.position_score(sparse))
    score = tokenizer.decode(sequence, tempo_qpm=first_tempo(notes, tokenizer.config.tempo_qpm))
    write_midi(score, output)
    return RoundtripReport(len(notes), score.note_num(), len(sequence), sparse.merged_notes, sparse.clamped_notes)
