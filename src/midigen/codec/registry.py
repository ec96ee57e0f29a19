"""Tokenizers by kind: `load_tokenizer(config)` builds the one `config.kind` names (saved in every store, run and
model folder)."""

from __future__ import annotations

from midigen.codec.config import TokenizerConfig
from midigen.codec.interface import Tokenizer
from midigen.codec.tokenizer import SeedTokenizer
from midigen.errors import MidigenError

TOKENIZERS: dict[str, type] = {"seed": SeedTokenizer}


def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.kind not in TOKENIZERS:
        raise MidigenError(f"unknown tokenizer kind {config.kind!r}; known: {', '.join(TOKENIZERS)}")
    tokenizer: Tokenizer = TOKENIZERS[config.kind](config)
    return tokenizer
