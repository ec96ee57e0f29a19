"""Tokenizers by kind: `load_tokenizer(config)` builds the one `config.kind` names (saved in every store, run and
model folder); a config with byte-pair merges builds the merging tokenizer around its kind's."""

from __future__ import annotations

from midigen.codec.bpe import BpeTokenizer
from midigen.codec.config import TokenizerConfig
from midigen.codec.interface import Tokenizer
from midigen.codec.miditok_kinds import MIDITOK_CLASSES, MiditokTokenizer
from midigen.codec.tokenizer import SeedTokenizer
from midigen.errors import MidigenError

TOKENIZERS: dict[str, type] = {"seed": SeedTokenizer} | dict.fromkeys(MIDITOK_CLASSES, MiditokTokenizer)


def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.kind not in TOKENIZERS:
        raise MidigenError(f"unknown tokenizer kind {config.kind!r}; known: {', '.join(TOKENIZERS)}")
    if config.merges:
        merging: Tokenizer = BpeTokenizer(config)
        return merging
    tokenizer: Tokenizer = TOKENIZERS[config.kind](config)
    return tokenizer
