"""Negative log-likelihood of a model on a split, by token type, against a bigram floor."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from midigen.codec.config import Vocab
from midigen.data.batching import Batch

TOKEN_TYPES = ("note", "duration", "sep")


def token_types(tokens: np.ndarray, vocab: Vocab) -> dict[str, np.ndarray]:
    """Boolean masks of the scored token types (end-of-song is scored but belongs to none)."""
    return {
        "note": (tokens >= vocab.note_offset) & (tokens < vocab.duration_offset),
        "duration": tokens >= vocab.duration_offset,
        "sep": tokens == Vocab.SEP,
    }


class NllAccumulator:
    """Sums of per-token NLL (model and bigram) over scored targets, split by target type."""

    def __init__(self, vocab: Vocab, bigram_log_probs: np.ndarray | None = None) -> None:
        self.vocab = vocab
        self.bigram = bigram_log_probs
        self.total = 0.0
        self.count = 0
        self.bigram_total = 0.0
        self.by_type = {name: [0.0, 0] for name in TOKEN_TYPES}

    def add(self, previous: np.ndarray, targets: np.ndarray, nll: np.ndarray) -> None:
        """previous, targets, nll: same shape; targets equal to padding (0) are ignored."""
        scored = targets != Vocab.PAD
        self.total += float(nll[scored].sum())
        self.count += int(scored.sum())
        for name, mask in token_types(targets, self.vocab).items():
            self.by_type[name][0] += float(nll[mask & scored].sum())
            self.by_type[name][1] += int((mask & scored).sum())
        if self.bigram is not None:
            self.bigram_total += float(-self.bigram[previous[scored], targets[scored]].sum())

    def result(self) -> dict[str, Any]:
        nll = self.total / max(1, self.count)
        out: dict[str, Any] = {
            "nll": nll,
            "ppl": math.exp(nll),
            "tokens": self.count,
            "nll_by_type": {name: s / n if n else None for name, (s, n) in self.by_type.items()},
        }
        if self.bigram is not None:
            out["bigram_nll"] = self.bigram_total / max(1, self.count)
        return out


def fit_bigram(sequences: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Log-probabilities log P(next | previous) of a count bigram with add-one smoothing."""
    counts = np.ones((vocab_size, vocab_size), dtype=np.float64)
    for tokens in sequences:
        np.add.at(counts, (tokens[:-1], tokens[1:]), 1.0)
    return np.log(counts / counts.sum(axis=1, keepdims=True))


@torch.no_grad()
def token_nll(model: torch.nn.Module, batch: Batch, device: torch.device) -> np.ndarray:
    """Per-target NLL (B, T) of a batch of windows (B, T+1)."""
    tensors = {name: torch.as_tensor(array, device=device) for name, array in batch.items()}
    output = model(tensors["tokens"][:, :-1], tensors["bars"][:, :-1], tensors["beats"][:, :-1])
    logits = output.logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), tensors["tokens"][:, 1:], reduction="none"
    )  # (B, T)
    return nll.cpu().numpy()


def evaluate_split(
    model: torch.nn.Module,
    store: Any,
    split: str,
    context: int,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """NLL of `model` on every token of a split (non-overlapping windows), by type, and the bigram floor.

    The bigram is fitted on the training split and scored on exactly the tokens the model predicts.
    """
    from tqdm import tqdm

    from midigen.data.batching import batched, evaluation_windows, gather_windows
    from midigen.errors import MidigenError

    songs = store.split_indices(split)
    if not songs:
        raise MidigenError(f"{store.root}: no songs in split {split!r}")
    vocab = store.config.vocab
    bigram = fit_bigram((store.song(i).tokens for i in store.split_indices("train")), vocab.size)
    accumulator = NllAccumulator(vocab, bigram)
    device = device or next(model.parameters()).device
    windows = evaluation_windows(store, songs, context)
    groups = list(batched(windows, batch_size))
    model.eval()
    for group in tqdm(groups, desc=f"eval {split}", unit="batch", disable=not progress):
        batch = gather_windows(store, group, context + 1)
        nll = token_nll(model, batch, device)
        accumulator.add(batch["tokens"][:, :-1], batch["tokens"][:, 1:], nll)
    return {"split": split, **accumulator.result()}
