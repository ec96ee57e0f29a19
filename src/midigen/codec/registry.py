"""Tokenizers by kind: `load_tokenizer(config)` builds the one `config.kind` names (saved in every store, run and
model folder); a config with byte-pair merges builds the merging tokenizer around its kind's. Tokenizers never
change once built, so one config's tokenizer is built once and shared (a MidiTok kind or thousands of merges take
a while to set up, and loading a store or a model asks for it several times)."""

from __future__ import annotations

import functools

from midigen.codec.bpe import BpeTokenizer
from midigen.codec.config import TokenizerConfig
from midigen.codec.interface import Tokenizer
from midigen.codec.miditok_kinds import MIDITOK_CLASSES, MiditokTokenizer
from midigen.codec.tokenizer import SeedTokenizer
from midigen.errors import MidigenError

TOKENIZERS: dict[str, type] = {"seed": SeedTokenizer} | dict.fromkeys(MIDITOK_CLASSES, MiditokTokenizer)


@functools.lru_cache(maxsize=16)
def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.kind not in TOKENIZERS:
        raise MidigenError(f"unknown tokenizer kind {config.kind!r}; known: {', '.join(TOKENIZERS)}")
    if config.merges:
        merging: Tokenizer = BpeTokenizer(config)
        return merging
    tokenizer: Tokenizer = TOKENIZERS[config.kind](config)
    return tokenizer
