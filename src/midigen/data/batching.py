"""Batches from a token store: random chunks for training, fixed windows for evaluation.

A batch is a dict of int64 arrays of shape (B, T+1): `tokens`, `bars`, `beats`. Inputs are
`[:, :-1]`, targets `[:, 1:]`; padding is token 0 and is never scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from midigen.codec.config import NUM_PITCHES, Vocab
from midigen.data.store import TokenStore
from midigen.errors import MidigenError

Batch = dict[str, np.ndarray]
FIELDS = ("tokens", "bars", "beats")


@dataclass(frozen=True)
class Window:
    song: int
    start: int


def song_arrays(store: TokenStore) -> dict[str, np.ndarray]:
    return {"tokens": store.arrays["tokens"], "bars": store.arrays["bars"], "beats": store.arrays["beats"]}


def gather_windows(store: TokenStore, windows: list[Window], length: int) -> Batch:
    """Rows of `length` tokens starting at each window, padded with 0 past the end of the song."""
    arrays = song_arrays(store)
    batch = {name: np.zeros((len(windows), length), dtype=np.int64) for name in FIELDS}
    for row, window in enumerate(windows):
        song = store.songs[window.song]
        begin = song.start + window.start
        end = min(song.start + song.length, begin + length)
        for name in FIELDS:
            batch[name][row, : end - begin] = arrays[name][begin:end]
    return batch


def transpose_notes(tokens: np.ndarray, vocab: Vocab, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every note of each row by one random number of semitones in [-max_shift, max_shift].

    Shifts that would push a note of the row out of 0..127 are never drawn, so no note is lost.
    """
    if max_shift <= 0:
        return tokens
    is_note = (tokens >= vocab.note_offset) & (tokens < vocab.duration_offset)
    pitches = np.where(is_note, tokens - vocab.note_offset, -1)
    highest = pitches.max(axis=1)
    lowest = np.where(is_note, pitches, NUM_PITCHES).min(axis=1)
    low = np.maximum(-max_shift, -np.where(highest >= 0, lowest, 0))
    high = np.minimum(max_shift, NUM_PITCHES - 1 - np.maximum(highest, 0))
    shifts = np.floor(low + rng.random(tokens.shape[0]) * (high - low + 1)).astype(np.int64)
    return np.where(is_note, tokens + shifts[:, None], tokens)


class RandomChunks:
    """Endless batches of random chunks of `context + 1` tokens from the given songs.

    Songs are drawn in proportion to their length, so every token is equally likely to be seen.
    The state (the random generator) is saved in checkpoints, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        store: TokenStore,
        songs: list[int],
        context: int,
        batch_size: int,
        seed: int,
        max_transpose: int = 0,
    ) -> None:
        if not songs:
            raise MidigenError(f"{store.root}: no songs to train on")
        self.store, self.songs, self.context, self.batch_size = store, np.asarray(songs), context, batch_size
        self.max_transpose = max_transpose
        lengths = np.array([store.songs[i].length for i in songs], dtype=np.float64)
        self.weights = lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picks = self.songs[self.rng.choice(len(self.songs), size=self.batch_size, p=self.weights)]
        windows = []
        for song in picks.tolist():
            room = max(0, self.store.songs[song].length - (self.context + 1))
            windows.append(Window(song, int(self.rng.integers(0, room + 1))))
        batch = gather_windows(self.store, windows, self.context + 1)
        batch["tokens"] = transpose_notes(batch["tokens"], self.store.config.vocab, self.max_transpose, self.rng)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def evaluation_windows(store: TokenStore, songs: list[int], context: int, limit: int | None = None) -> list[Window]:
    """Consecutive windows over each song; each token but a song's first is predicted exactly once."""
    windows = []
    for song in songs:
        windows.extend(Window(song, start) for start in range(0, store.songs[song].length - 1, context))
    if limit is None or len(windows) <= limit:
        return windows
    # evenly spread over the split, so a capped set still samples every part of it
    picks = np.linspace(0, len(windows) - 1, limit).round().astype(int)
    return [windows[i] for i in picks]


def batched(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    for first in range(0, len(windows), batch_size):
        yield windows[first : first + batch_size]
