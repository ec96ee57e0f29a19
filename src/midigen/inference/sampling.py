"""Turning logits into tokens, for a batch of lanes: grammar mask, temperature, top-k, top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from midigen.errors import MidigenError

# Below this temperature sampling is greedy: every token but the likeliest would get a probability under
# exp(−gap / 1e-6), which float32 cannot tell from 0 unless two logits tie to within about 1e-5, and dividing
# the logits by a temperature near float32's smallest (1e-45) overflows them to ±inf and the softmax to NaN.
GREEDY_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (or below `GREEDY_TEMPERATURE`) means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MidigenError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MidigenError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MidigenError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def sample_tokens(logits: torch.Tensor, allowed: torch.Tensor, config: SamplingConfig,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Draw one token per lane from `logits` (B, V) restricted to `allowed` (B, V) bool → (B,) long.

    Lane i draws as `torch.multinomial(probs[i], 1, generator=generators[i])` does (the argmax of p / q, q drawn
    from Exp(1) on the CPU generator), so a lane draws the same tokens whatever other lanes share its batch, on any
    device, and as every earlier midigen did one lane at a time.
    """
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if config.greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits / config.temperature
    if config.top_k > 0:
        top = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values  # (B, k)
        kth = allowed.sum(-1, keepdim=True).clamp(max=top.shape[-1]) - 1  # fewer allowed tokens than k: all of them
        logits = logits.masked_fill(logits < top.gather(-1, kth), float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= config.top_p  # the first token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    noise = torch.empty(probs.shape)  # (B, V) on the CPU, one row per lane's generator
    for row, generator in zip(noise, generators):
        row.exponential_(1, generator=generator)
    return torch.argmax(probs / noise.to(probs.device), dim=-1)
