"""Turning logits into a token: grammar mask, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midigen.errors import MidigenError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MidigenError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MidigenError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MidigenError(f"top-p must be in (0, 1], got {self.top_p}")


def sample_token(logits: torch.Tensor, allowed: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> int:
    """Draw one token from `logits` (V,) restricted to `allowed` (V,) bool."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if config.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, int(allowed.sum()))
        threshold = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= config.top_p  # the first token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
