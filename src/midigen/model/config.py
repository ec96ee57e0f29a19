"""`ModelConfig`: everything needed to rebuild a model, saved inside each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from midigen.codec.config import TokenizerConfig
from midigen.codec.registry import load_tokenizer
from midigen.codec.tokenizer import one_hot_counts
from midigen.config import JsonConfig
from midigen.errors import MidigenError

MEMORY_MODES = ("none", "xl", "knn")
MERGED_NOTES = ("first", "sum")

if TYPE_CHECKING:
    from midigen.codec.interface import Tokenizer


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """A decoder-only music transformer.

    vocab_size: from the tokenizer.
    embeddings: the token features embedded and summed with the token embedding, by name, with how many values
        each takes (a feature's value is taken modulo it): `bars` (the bar index, so its position in a phrase of
        that many bars), `beats` (position in the bar), `instruments`... as the tokenizer declares them
        (`ModelConfig.preset` takes them from it).
    derived_embeddings: features the model derives from each token's id alone, through the tokenizer's
        `token_lookups` (`pitch_classes`, `octaves` of note tokens), embedded like `embeddings` but never stored nor
        passed: everything that reads `embeddings` as the features carried per position stays unchanged.
    merged_notes: how a merged (BPE) token holding several notes takes their derived features: "sum" (the sum
        of every note's embeddings) or "first" (its first note's values).
    factorised_output: predict each pitched note token as its type, then its pitch class, then its octave
        (`midigen.model.pitch_output`), instead of one output per token.
    context: tokens per segment (training window, and the generation window without memory).
    rel_pos_buckets, rel_pos_max_distance: T5-style relative-position buckets (exact below half the
        buckets, then logarithmic; distances near and beyond the max distance share the last bucket).
    memory: "none", "xl" (each layer also attends to the previous segment) or "knn" (XL, plus a
        kNN memory of the whole song so far on one layer).
    xl_length: how many past tokens the XL memory keeps (0 = one segment, i.e. `context`).
    knn_layer: index of the kNN layer; negative counts from the top (-4 = 4th from the top).
    knn_top_k, knn_capacity: neighbours retrieved per query and head; entries kept per lane (FIFO).
    """

    vocab_size: int = 388
    embeddings: dict[str, int] = field(default_factory=lambda: {"bars": 32, "beats": 64})
    derived_embeddings: dict[str, int] = field(default_factory=dict)
    merged_notes: str = "sum"
    factorised_output: bool = False
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    context: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.1
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 512
    tie_embeddings: bool = True
    memory: str = "none"
    xl_length: int = 0
    knn_layer: int = -4
    knn_top_k: int = 32
    knn_capacity: int = 65536

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise MidigenError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.memory not in MEMORY_MODES:
            raise MidigenError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        if self.merged_notes not in MERGED_NOTES:
            raise MidigenError(f"merged_notes must be one of {', '.join(MERGED_NOTES)}, got {self.merged_notes!r}")
        if self.context < 2:
            raise MidigenError(f"context must be at least 2, got {self.context}")
        if not -self.n_layers <= self.knn_layer < self.n_layers:
            raise MidigenError(f"knn_layer {self.knn_layer} is outside a {self.n_layers}-layer model")
        for name, size in (self.embeddings | self.derived_embeddings).items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise MidigenError(f"embedding {name!r} needs a positive size, got {size!r}")
        both = sorted(set(self.embeddings) & set(self.derived_embeddings))
        if both:
            raise MidigenError(f"feature(s) {', '.join(both)} cannot be both carried per position and derived")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def memory_length(self) -> int:
        """Past tokens each layer attends to besides its own segment (0 without XL memory)."""
        if self.memory == "none":
            return 0
        return self.xl_length or self.context

    @property
    def reach(self) -> int:
        """Tokens back the model attends to: its segment plus its XL memory (beyond it, only the kNN memory)."""
        return self.context + self.memory_length

    @property
    def knn_layer_index(self) -> int | None:
        if self.memory != "knn":
            return None
        return self.knn_layer % self.n_layers

    def derived_weights(self, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
        """Per derived feature, (V, values) float32: how much of each value's embedding each token takes (a one-hot
        row per token, or with `merged_notes` "sum" the count of a merged token's notes at each value)."""
        if not self.derived_embeddings:
            return {}
        if self.merged_notes == "sum":
            return tokenizer.token_value_counts()
        return one_hot_counts(tokenizer.token_lookups())

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> ModelConfig:
        """A config as saved in a run or model folder; one of midigen 0.2 (bar and beat embeddings as the fields
        `use_bar_beat`, `num_bars` and `beat_positions`) is read as the same model; one saved before derived features
        derives none (and merged tokens take their first note's); one saved before the factorised output has one
        output per token."""
        if isinstance(data, dict) and "embeddings" not in data and {"use_bar_beat", "num_bars", "beat_positions"} <= set(data):
            data = dict(data)
            use, bars, beats = data.pop("use_bar_beat"), data.pop("num_bars"), data.pop("beat_positions")
            data["embeddings"] = {"bars": bars, "beats": beats} if use else {}
        if isinstance(data, dict) and "derived_embeddings" not in data:
            data = data | {"derived_embeddings": {}}
        if isinstance(data, dict) and "merged_notes" not in data:
            data = data | {"merged_notes": "first"}
        if isinstance(data, dict) and "factorised_output" not in data:
            data = data | {"factorised_output": False}
        return cls.from_dict(data, complete=True)

    @classmethod
    def preset(cls, name: str, tokenizer: TokenizerConfig | None = None, num_bars: int | None = None,
               derived_features: bool = False, **overrides: Any) -> ModelConfig:
        """A preset size for `tokenizer`'s vocabulary and features (bars embedded modulo the preset's `num_bars`);
        with `derived_features`, also the features the tokenizer derives from token ids (pitch class and octave)."""
        if name not in PRESETS:
            raise MidigenError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        settings = dict(PRESETS[name])
        bars = num_bars or int(settings.pop("num_bars", 32))  # type: ignore[call-overload]
        codec = load_tokenizer(tokenizer or TokenizerConfig())
        embeddings = {feature: size or bars for feature, size in codec.feature_sizes.items()}
        derived = ({feature: int(lookup.max()) + 1 for feature, lookup in codec.token_lookups().items()}
                   if derived_features else {})
        base = cls(vocab_size=codec.vocab.size, embeddings=embeddings, derived_embeddings=derived)
        return replace(base, **(settings | overrides))


PRESETS: dict[str, dict[str, object]] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, context=64, num_bars=8, rel_pos_buckets=16,
                 rel_pos_max_distance=128, knn_layer=-1, knn_top_k=8, knn_capacity=4096),
    "small": dict(d_model=192, n_layers=4, n_heads=4, context=256, dropout=0.1, attn_dropout=0.0),
    "base": dict(d_model=512, n_layers=8, n_heads=8, context=256),
}
