"""Negative log-likelihood of a model on a split, by token type, against a bigram floor."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from midigen.codec.config import PAD_ID
from midigen.data.batching import Batch, SongLanes, TokenArrays, model_inputs
from midigen.errors import MidigenError
from midigen.evaluation.recall import recall_targets
from midigen.model.memory import MemoryState

class NllAccumulator:
    """Sums of per-token NLL (model and bigram) over scored targets, split by target type."""

    def __init__(self, token_types: dict[str, np.ndarray], bigram_log_probs: np.ndarray | None = None,
                 note_counts: np.ndarray | None = None) -> None:
        self.token_types = token_types  # name → (V,) bool
        self.bigram = bigram_log_probs
        self.note_counts = note_counts  # (V,) int: the notes each token starts (`Tokenizer.note_counts`)
        self.total = 0.0
        self.count = 0
        self.notes = 0
        self.bigram_total = 0.0
        self.by_type = {name: [0.0, 0] for name in token_types}

    def add(self, previous: np.ndarray, targets: np.ndarray, nll: np.ndarray) -> None:
        """previous, targets, nll: same shape; targets equal to padding (0) are ignored."""
        scored = targets != PAD_ID
        self.total += float(nll[scored].sum())
        self.count += int(scored.sum())
        if self.note_counts is not None:
            self.notes += int(self.note_counts[targets[scored]].sum())
        for name, of_type in self.token_types.items():
            mask = of_type[targets] & scored
            self.by_type[name][0] += float(nll[mask].sum())
            self.by_type[name][1] += int(mask.sum())
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
        if self.note_counts is not None:  # total NLL over all scored tokens, per note among them
            out["nll_per_note"] = self.total / self.notes if self.notes else None
            out["notes"] = self.notes
        return out


def seconds_at(step: int, tempos: Sequence[tuple[int, float]], steps_per_quarter: int) -> float:
    """Seconds from step 0 to `step` under a tempo map of (step, quarter notes per minute) changes in step order;
    the first change holds from step 0 whatever its step."""
    starts = [0, *(start for start, _ in tempos[1:])]
    ends = [*starts[1:], step]
    return sum(max(0, min(end, step) - start) * 60.0 / (qpm * steps_per_quarter)
               for start, end, (_, qpm) in zip(starts, ends, tempos))


def fit_bigram(sequences: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Log-probabilities log P(next | previous) of a count bigram with add-one smoothing."""
    counts = np.ones((vocab_size, vocab_size), dtype=np.float64)
    for tokens in sequences:
        np.add.at(counts, (tokens[:-1], tokens[1:]), 1.0)
    return np.log(counts / counts.sum(axis=1, keepdims=True))


@torch.no_grad()
def score_songs(
    model: torch.nn.Module, data: TokenArrays, songs: list[int], lanes: int, device: torch.device,
    knn_device: torch.device | None = None,
) -> Iterator[tuple[Batch, Tensor]]:
    """Every token of `songs` once, in order, with the model's memory: yields (batch, NLL (B, T) of its targets).

    Songs are played back to back in `lanes` lanes; lanes' memories are cleared between songs. The kNN stores
    live on `knn_device` (default `device`).
    """
    model.eval()
    memory = MemoryState(model.config, lanes, device, knn_device)
    for batch in SongLanes(data, songs, model.config.context, lanes, seed=0, shuffle=False, endless=False):
        tensors = {name: value.to(device) for name, value in batch.items()}
        tokens, features, targets = model_inputs(tensors, model.config.embeddings)
        output = memory.forward(model, tokens, features, new_song=tensors["new_song"])
        nll = torch.nn.functional.cross_entropy(output.logits.float().transpose(1, 2), targets, reduction="none")
        yield batch, nll.cpu()


def evaluate_split(
    model: torch.nn.Module,
    store: Any,
    split: str,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """NLL of `model` on every token of a split, by type, and the bigram floor; and the NLL on the recall tokens
    (`midigen.evaluation.recall`: repeats of passages beyond the model's window and XL memory) and on the others.

    The bigram is fitted on the training split and scored on exactly the tokens the model predicts. The summed
    NLL is also given per note (`nll_per_note`, nats over the notes the scored tokens encode) and per second of
    music (`bits_per_second`, bits over the `seconds` from step 0 to each song's last step under its tempo map).
    """
    from tqdm import tqdm

    songs = store.split_indices(split)
    if not songs:
        raise MidigenError(f"{store.root}: no songs in split {split!r}")
    bigram = fit_bigram((store.song(i).tokens for i in store.split_indices("train")), store.tokenizer.vocab.size)
    accumulator = NllAccumulator(store.tokenizer.token_types(), bigram, store.tokenizer.note_counts())
    default_tempos = ((0, store.config.tempo_qpm),)  # a store of midigen 0.2 kept no tempo map
    seconds = sum(seconds_at(int(store.song(i).steps.max(initial=0)), store.songs[i].tempos or default_tempos,
                             store.config.steps_per_quarter) for i in songs)
    device = device or next(model.parameters()).device
    data = TokenArrays(store, "memmap")
    total = int(np.maximum(store.songs.lengths[songs] - 1, 0).sum())
    reach = model.config.reach
    recall = {song: recall_targets(store.song(song).tokens, reach) for song in songs}
    recall_sums = {True: [0.0, 0], False: [0.0, 0]}
    with tqdm(total=total, desc=f"eval {split}", unit="tok", disable=not progress) as bar:
        for batch, nll in score_songs(model, data, songs, min(batch_size, len(songs)), device):
            tokens, nll = batch["tokens"].numpy(), nll.numpy()
            accumulator.add(tokens[:, :-1], tokens[:, 1:], nll)
            for lane, (song, offset) in enumerate(zip(batch["song"].tolist(), batch["offset"].tolist())):
                if song < 0:
                    continue
                targets = recall[song][offset + 1 : offset + 1 + nll.shape[1]]  # (≤ T,) the lane's targets
                scored = nll[lane, : targets.size][tokens[lane, 1 : 1 + targets.size] != 0]
                is_recall = targets[tokens[lane, 1 : 1 + targets.size] != 0]
                for kind in (True, False):
                    recall_sums[kind][0] += float(scored[is_recall == kind].sum())
                    recall_sums[kind][1] += int((is_recall == kind).sum())
            bar.update(int((tokens[:, 1:] != 0).sum()))
    (recall_total, recall_count), (other_total, other_count) = recall_sums[True], recall_sums[False]
    figures = accumulator.result()
    figures["seconds"] = seconds
    figures["bits_per_second"] = accumulator.total / math.log(2) / seconds if seconds else None
    return {"split": split, **figures,
            "recall_nll": recall_total / recall_count if recall_count else None, "recall_tokens": recall_count,
            "other_nll": other_total / other_count if other_count else None, "reach": reach}
