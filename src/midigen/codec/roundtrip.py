"""Encode then decode one file: what a user hears is exactly what the encoding keeps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import write_midi
from midigen.codec.sandbox import DEFAULT_TIMEOUT_S, encode_isolated
from midigen.codec.registry import load_tokenizer
from midigen.errors import MidigenError


@dataclass
class RoundtripReport:
    notes_in: int
    notes_out: int
    tokens: int
    merged: int
    clamped: int


def roundtrip_file(
    source: str | Path,
    output: str | Path,
    config: TokenizerConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RoundtripReport:
    """Encode `source` (in a worker process, as the parser may crash on a bad file) and decode it to `output`.

    Raises `BadMidiError` naming the file and the reason when it cannot be encoded, `MidigenError`
    when `output` cannot be written.
    """
    tokenizer = load_tokenizer(config or TokenizerConfig())
    song = encode_isolated(source, tokenizer.config, timeout_s)
    score = tokenizer.decode(song.sequence(tokenizer), song.tempos)
    try:
        write_midi(score, output)
    except OSError as exc:
        raise MidigenError(f"{output}: cannot write: {exc.strerror or exc}") from None
    return RoundtripReport(song.notes, score.note_num(), song.length, song.merged, song.clamped)
