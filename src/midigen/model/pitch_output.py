"""The factorised output: a pitched note predicted as its type, then its pitch class, then its octave.

With one logit per token, a C4 and a C5 share nothing at the output: the model learns "a C comes next" once per
octave. Here every token that is one pitched note event (`Tokenizer.token_pitches`) is predicted in steps,
    p(token of type g at pitch 12·o + c) = p(g) · p(c | g) · p(o | g, c),
where p(g) comes from the same softmax as every other token (a note-on and a MIDI-like note-off are two types, each
with its own pitch classes and octaves). The result is the normalised log-probability of every token of the
vocabulary, which callers take as logits: cross-entropy, sampling, temperature and grammar masks work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from midigen.codec.config import NUM_PITCHES
from midigen.errors import MidigenError

if TYPE_CHECKING:
    from midigen.codec.interface import Tokenizer

PITCH_CLASSES = 12
OCTAVES = -(-NUM_PITCHES // PITCH_CLASSES)  # 11: pitches 120-127 are the only ones of octave 10


@dataclass(frozen=True)
class PitchedTokens:
    """Which tokens the factorised output predicts in steps: each token's pitch and the index of its type among
    the pitched types (both −1 for every other token)."""

    pitches: np.ndarray  # (V,) int64
    types: np.ndarray  # (V,) int64

    @property
    def num_types(self) -> int:
        return int(self.types.max()) + 1

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PitchedTokens:
        """The tokenizer's pitched note tokens, grouped by its token types (`Tokenizer.token_types`)."""
        pitches = np.asarray(tokenizer.token_pitches(), dtype=np.int64)
        types = np.full(pitches.shape, -1, dtype=np.int64)
        for name, mask in tokenizer.token_types().items():
            members = np.asarray(mask, dtype=bool) & (pitches >= 0)
            if not members.any():
                continue
            if np.unique(pitches[members]).size < members.sum():
                raise MidigenError(f"the factorised output needs one token per pitch of each type; the tokenizer's "
                                   f"{name!r} tokens repeat a pitch")
            types[members] = types.max() + 1
        if not (types >= 0).any():
            raise MidigenError("the factorised output needs pitched note tokens; this tokenizer has none")
        untyped = np.flatnonzero((pitches >= 0) & (types < 0))
        if untyped.size:
            raise MidigenError(f"the factorised output needs every pitched token in a token type; token "
                               f"{int(untyped[0])} is in none")
        return cls(pitches, types)


def fill_of(allowed: np.ndarray) -> Tensor:
    """Added to logits before a softmax over the last axis: −inf where not `allowed`, 0 where allowed and on rows
    with nothing allowed (never read, and kept finite so that their gradients stay 0, not NaN)."""
    blocked = ~allowed & allowed.any(-1, keepdims=True)
    return torch.as_tensor(np.where(blocked, -np.inf, 0.0), dtype=torch.float32)


class FactorisedPitchOutput(nn.Module):
    def __init__(self, d_model: int, pitched: PitchedTokens) -> None:
        super().__init__()
        G = pitched.num_types
        is_pitched = pitched.pitches >= 0
        pitch_class, octave = pitched.pitches % PITCH_CLASSES, pitched.pitches // PITCH_CLASSES
        # each pitched token's place in the flattened (G, 12, OCTAVES) grid of type, pitch class and octave
        slot = np.where(is_pitched, (pitched.types * PITCH_CLASSES + pitch_class) * OCTAVES + octave, 0)
        held = np.zeros(G * PITCH_CLASSES * OCTAVES, dtype=bool)
        held[slot[is_pitched]] = True
        held = held.reshape(G, PITCH_CLASSES, OCTAVES)
        self.register_buffer("pitched", torch.as_tensor(is_pitched), persistent=False)  # (V,)
        self.register_buffer("slot", torch.as_tensor(slot), persistent=False)  # (V,)
        self.register_buffer("octave_fill", fill_of(held), persistent=False)  # (G, 12, OCTAVES)
        self.register_buffer("pitch_class_fill", fill_of(held.any(-1)), persistent=False)  # (G, 12)
        self.register_buffer("type_sizes", torch.as_tensor(np.bincount(pitched.types[is_pitched], minlength=G)),
                             persistent=False)  # (G,)
        self.types = nn.Linear(d_model, G)
        self.pitch_classes = nn.Linear(d_model, G * PITCH_CLASSES)
        self.octaves = nn.Linear(d_model, G * PITCH_CLASSES * OCTAVES)

    def start_even(self) -> None:
        """Start each type's logit at the log of its number of tokens: with every logit near 0, each token then
        starts about as likely as any other, as with one output per token (a type's logit at 0 would make each of
        its notes start over a hundred times less likely than another token)."""
        with torch.no_grad():
            self.types.bias.copy_(self.type_sizes.float().log())

    def forward(self, x: Tensor, token_logits: Tensor) -> Tensor:
        """x (B, T, C), token_logits (B, T, V) → log-probabilities (B, T, V)."""
        B, T, _ = x.shape
        V = token_logits.shape[-1]
        G = self.types.out_features
        unpitched = token_logits.float().masked_fill(self.pitched, float("-inf"))
        flat = torch.cat([unpitched, self.types(x).float()], -1).log_softmax(-1)  # (B, T, V + G)
        pitch_class = (self.pitch_classes(x).float().view(B, T, G, PITCH_CLASSES) + self.pitch_class_fill
                       ).log_softmax(-1)  # (B, T, G, 12)
        octave = (self.octaves(x).float().view(B, T, G, PITCH_CLASSES, OCTAVES) + self.octave_fill
                  ).log_softmax(-1)  # (B, T, G, 12, OCTAVES)
        pitch = (flat[..., V:, None, None] + pitch_class.unsqueeze(-1) + octave).flatten(2)  # (B, T, G·12·OCTAVES)
        return torch.where(self.pitched, pitch[..., self.slot], flat[..., :V])  # (B, T, V)
