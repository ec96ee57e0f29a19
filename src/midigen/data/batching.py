"""Batches from a token store.

A batch is a dict of int64 tensors of shape (B, T+1), `tokens` and the store's features (`bars`, `beats`, ...;
`model_inputs` splits off inputs `[:, :-1]` and targets `[:, 1:]`; padding is `PAD_ID` and is never scored), plus
`new_song` (B,) bool:
the lane starts a song here, so its memory must be cleared first. Song lanes also give `song` (B,):
each lane's song index in the store (−1 for an idle lane), and `offset` (B,): where in its song
each row starts.

- `RandomChunks`: random windows (no memory between batches).
- `SongLanes("song")`: each lane holds one song, chunked in order; lanes wait for the longest.
- `SongLanes("contiguous")`: each lane plays songs back to back; a lane that finishes a song takes
  the next one from a shuffled queue at once, so lanes switch songs at different times. When the
  queue runs dry the other lanes finish their songs with padding: every epoch covers every token
  of every song exactly once.
- `StaggeredLanes`: contiguous lanes that never idle: the queue is refilled as soon as it runs dry, and each
  lane's first song starts at a random point, so lanes are out of step from the start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from midigen.codec.config import NUM_PITCHES
from midigen.data.store import TokenStore
from midigen.errors import MidigenError

Batch = dict[str, Tensor]
log = logging.getLogger(__name__)


def model_inputs(batch: Batch, features: Iterable[str]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """A batch's input tokens (B, T), the named input features (B, T) each, and the targets (B, T)."""
    tokens = batch["tokens"]
    return tokens[:, :-1], {name: batch[name][:, :-1] for name in features}, tokens[:, 1:]


PITCH_SCAN_TOKENS = 1 << 20  # tokens per block when scanning songs' pitch ranges (int64: 8 MiB)


def batch_fields(store: TokenStore) -> list[str]:
    """The arrays a batch carries: the tokens and every feature of the store's tokenizer."""
    return ["tokens", *store.tokenizer.feature_sizes]


class TokenArrays:
    """The store's token and feature arrays where training reads them: memory-mapped from disk, loaded into CPU
    memory, or on the GPU."""

    def __init__(self, store: TokenStore, location: str = "memmap", device: torch.device | None = None) -> None:
        self.store = store
        self.starts, self.lengths = store.songs.starts.copy(), store.songs.lengths.copy()  # (N,) each
        self.location = resolve_location(location, store, device)
        self.device = device if self.location == "gpu" else torch.device("cpu")
        self.transposable = store.tokenizer.transposable_pitches()  # (V,) pitch of each moving token, else −1
        arrays = {name: store.arrays[name] for name in batch_fields(store)}
        if self.location == "memmap":
            self.arrays: dict[str, Any] = arrays
        elif self.location == "cpu":
            self.arrays = {name: torch.from_numpy(np.asarray(a, dtype=np.int64)) for name, a in arrays.items()}
        else:
            self.arrays = {name: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device) for name, a in arrays.items()}

    def gather(self, songs: np.ndarray, offsets: np.ndarray, length: int) -> Batch:
        """Rows of `length` tokens from `offsets` in `songs` (song −1: an idle lane), zero past a song's end."""
        songs, offsets = np.asarray(songs, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
        active = songs >= 0
        begin = np.where(active, self.starts[songs.clip(min=0)] + offsets, 0)
        end = np.where(active, self.starts[songs.clip(min=0)] + self.lengths[songs.clip(min=0)], 0)
        index = begin[:, None] + np.arange(length)[None, :]  # (B, length)
        inside = index < end[:, None]
        index = np.where(inside, index, 0)
        batch = {}
        for name in self.arrays:
            source = self.arrays[name]
            if self.location == "memmap":
                rows = torch.from_numpy(np.asarray(source[index], dtype=np.int64))
            else:
                rows = source[torch.as_tensor(index, device=self.device)]
            batch[name] = rows * torch.as_tensor(inside, device=rows.device)
        return batch

    def pitch_ranges(self, songs: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest pitch of the transposable tokens of each of `songs` (default: all), by song index
        (128 / −1 for a song without any, or not asked for), read a block of songs at a time, so a memory-mapped
        store is never loaded whole."""
        tokens = self.store.arrays["tokens"]
        lowest = np.full(len(self.starts), NUM_PITCHES)
        highest = np.full(len(self.starts), -1)
        chosen = np.arange(len(self.starts)) if songs is None else np.unique(np.asarray(songs, dtype=np.int64))
        chosen = chosen[self.lengths[chosen] > 0]
        blocks = self.starts[chosen] // PITCH_SCAN_TOKENS  # songs starting in one window are read together
        for block in np.split(chosen, np.flatnonzero(np.diff(blocks)) + 1) if chosen.size else []:
            begin, end = self.starts[block[0]], self.starts[block[-1]] + self.lengths[block[-1]]
            pitch = self.transposable[np.asarray(tokens[begin:end], dtype=np.int64)]  # (end − begin,)
            # each song's own span (songs not asked for may lie between): reduce [start, end) pairs, keep the first
            bounds = np.stack([self.starts[block], self.starts[block] + self.lengths[block]], axis=1).ravel() - begin
            for values, reduce, out, none in ((np.where(pitch >= 0, pitch, NUM_PITCHES), np.minimum, lowest,
                                               NUM_PITCHES), (pitch, np.maximum, highest, -1)):
                out[block] = reduce.reduceat(np.append(values, none), bounds)[::2]
        return lowest, highest


def resolve_location(location: str, store: TokenStore, device: torch.device | None) -> str:
    """`auto`: the GPU when training there and the store takes under a quarter of its memory, else CPU
    memory when it takes under a quarter of that, else memory-mapped from disk."""
    needed = store.num_tokens * 8 * len(batch_fields(store))  # int64 once loaded
    on_gpu = device is not None and device.type == "cuda"
    if location == "gpu" and not on_gpu:
        raise MidigenError("--data-location gpu needs training on a CUDA device")
    if location != "auto":
        return location
    if on_gpu and needed < torch.cuda.mem_get_info(device)[0] / 4:
        return "gpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return "cpu" if needed < ram / 4 else "memmap"


def transpose_notes(tokens: Tensor, shifts: np.ndarray, transposable: np.ndarray) -> Tensor:
    """Shift the notes of each row (B, T) by its own number of semitones (`transposable` (V,): the pitch of each
    token that moves, −1 for the others; a moved token's id moves by the same number)."""
    moves = torch.as_tensor(transposable >= 0, device=tokens.device)[tokens]
    return torch.where(moves, tokens + torch.as_tensor(shifts, device=tokens.device).view(-1, 1), tokens)


def draw_shifts(lowest: np.ndarray, highest: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """A shift per row, uniform over the whole semitones in [-max_shift, max_shift] that keep every note of the row
    inside 0..127: a row whose notes come within `max_shift` of either end has fewer shifts to choose from (notes
    are never folded or clipped), and a row with no notes (lowest 128, highest −1) may take any shift."""
    low = np.maximum(-max_shift, -np.minimum(lowest, NUM_PITCHES - 1).clip(min=0))
    high = np.minimum(max_shift, NUM_PITCHES - 1 - np.maximum(highest, 0))
    high = np.maximum(high, low)
    return np.floor(low + rng.random(len(low)) * (high - low + 1)).astype(np.int64)


class RandomChunks:
    """Endless batches of random chunks of `context + 1` tokens from the given songs.

    Songs are drawn in proportion to their length, so every token is equally likely to be seen.
    Each chunk is transposed by a random shift that keeps its notes in range.
    """

    def __init__(self, data: TokenArrays, songs: list[int], context: int, batch_size: int, seed: int,
                 max_transpose: int = 0) -> None:
        if not songs:
            raise MidigenError(f"{data.store.root}: no songs to train on")
        self.data, self.songs, self.context, self.batch_size = data, np.asarray(songs), context, batch_size
        self.max_transpose = max_transpose
        lengths = data.lengths[self.songs].astype(np.float64)
        self.weights = lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> RandomChunks:
        return self

    def __next__(self) -> Batch:
        picks = self.songs[self.rng.choice(len(self.songs), size=self.batch_size, p=self.weights)]
        room = np.maximum(0, self.data.lengths[picks] - (self.context + 1))
        offsets = np.floor(self.rng.random(self.batch_size) * (room + 1)).astype(np.int64)
        batch = self.data.gather(picks, offsets, self.context + 1)
        if self.max_transpose:
            tokens = batch["tokens"]
            pitch = torch.as_tensor(self.data.transposable, device=tokens.device)[tokens]  # (B, T), −1: not a note
            lowest = torch.where(pitch >= 0, pitch, NUM_PITCHES).min(dim=1).values.cpu().numpy()
            highest = pitch.max(dim=1).values.cpu().numpy()
            batch["tokens"] = transpose_notes(tokens, draw_shifts(lowest, highest, self.max_transpose, self.rng),
                                              self.data.transposable)
        batch["new_song"] = torch.ones(self.batch_size, dtype=torch.bool)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class SongLanes:
    """Songs played in order, one per lane, in segments of `context` tokens (see the module doc).

    A segment is `context + 1` tokens whose last token is the first of the next segment, so each
    token after a song's first is a target exactly once. A song's transposition is drawn once, when
    its lane takes it, so the memory of a song is never transposed halfway.
    """

    def __init__(self, data: TokenArrays, songs: list[int], context: int, lanes: int, seed: int,
                 mode: str = "contiguous", max_transpose: int = 0, shuffle: bool = True, endless: bool = True) -> None:
        if not songs:
            raise MidigenError(f"{data.store.root}: no songs to train on")
        if mode not in ("song", "contiguous"):
            raise MidigenError(f"unknown song batching mode {mode!r}")
        self.data, self.songs, self.context, self.lanes, self.mode = data, list(songs), context, lanes, mode
        self.max_transpose, self.shuffle, self.endless = max_transpose, shuffle, endless
        self.rng = np.random.default_rng(seed)
        # without transposition every song takes the shift 0 whatever its range: no need to read the songs
        self.lowest, self.highest = data.pitch_ranges(self.songs if max_transpose else [])
        self.epoch = 0
        self.queue: list[int] = []
        self.lane_song = np.full(lanes, -1, dtype=np.int64)
        self.lane_offset = np.zeros(lanes, dtype=np.int64)
        self.lane_shift = np.zeros(lanes, dtype=np.int64)
        self.started = False

    def __iter__(self) -> SongLanes:
        return self

    def _new_epoch(self) -> None:
        order = self.rng.permutation(len(self.songs)) if self.shuffle else np.arange(len(self.songs))
        self.queue = [self.songs[i] for i in order]
        self.epoch += 1

    def _finished(self) -> np.ndarray:
        """Lanes with no target left in their song (idle lanes included)."""
        lengths = np.where(self.lane_song >= 0, self.data.lengths[self.lane_song.clip(min=0)], 0)
        return self.lane_offset + 1 >= lengths

    def _take(self, lane: int) -> bool:
        if not self.queue:
            self.lane_song[lane] = -1
            return False
        song = self.queue.pop(0)
        self.lane_song[lane], self.lane_offset[lane] = song, 0
        self.lane_shift[lane] = draw_shifts(self.lowest[[song]], self.highest[[song]], self.max_transpose, self.rng)[0]
        return True

    def __next__(self) -> Batch:
        if self.started:
            self.lane_offset += self.context
        self.started = True
        finished = self._finished()
        if finished.all() and not self.queue:
            if self.epoch > 0 and not self.endless:
                raise StopIteration
            self._new_epoch()
        new_song = np.zeros(self.lanes, dtype=bool)
        if self.mode == "contiguous" or finished.all():
            for lane in np.flatnonzero(finished):
                new_song[lane] = self._take(int(lane)) or self.lane_song[lane] == -1
        return self._batch(new_song)

    def _batch(self, new_song: np.ndarray) -> Batch:
        """Each lane's next `context + 1` tokens (transposed by its shift), with which lanes began a new song."""
        batch = self.data.gather(self.lane_song, self.lane_offset, self.context + 1)
        batch["tokens"] = transpose_notes(batch["tokens"], self.lane_shift, self.data.transposable)
        batch["new_song"] = torch.as_tensor(new_song)
        batch["song"] = torch.as_tensor(self.lane_song.copy())
        batch["offset"] = torch.as_tensor(self.lane_offset.copy())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "queue": list(self.queue),
            "lane_song": self.lane_song.tolist(),
            "lane_offset": self.lane_offset.tolist(),
            "lane_shift": self.lane_shift.tolist(),
            "started": self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.queue, self.started = state["epoch"], list(state["queue"]), state["started"]
        self.lane_song = np.array(state["lane_song"], dtype=np.int64)
        self.lane_offset = np.array(state["lane_offset"], dtype=np.int64)
        self.lane_shift = np.array(state["lane_shift"], dtype=np.int64)


class StaggeredLanes(SongLanes):
    """Songs played in order, back to back in each lane, with no lane ever idle: for memory, fast to learn from.

    Like `SongLanes("contiguous")`, each lane reads its song in segments of `context` tokens (each token after a
    song's first a target once per reading; a song's transposition drawn when its lane takes it) and its memory
    is cleared when it takes the next song. Unlike it, the shuffled queue of songs is refilled with a new
    permutation as soon as it runs dry, so no lane waits for the longest song with padding (with few songs of
    unequal length, contiguous lanes spend most of their rows on padding: 63% over the first 300 steps of 16
    lanes on the Beethoven quartets), and each lane's first song starts at a random point, so that lanes are out
    of step from the first batch: they neither all read openings at once nor change songs together. Epochs are
    not aligned across lanes (a song may play in two lanes at once, at different points), and more lanes than
    songs is fine.
    """

    def __init__(self, data: TokenArrays, songs: list[int], context: int, lanes: int, seed: int,
                 max_transpose: int = 0) -> None:
        playable = [song for song in songs if data.lengths[song] > 1]  # a song of one token has no target
        if not playable:
            raise MidigenError(f"{data.store.root}: no songs to train on")
        super().__init__(data, playable, context, lanes, seed, "contiguous", max_transpose)

    def _start(self, lane: int, random_point: bool) -> None:
        """Give `lane` the next song of the queue (refilled first if dry), from its opening or a random point."""
        if not self.queue:
            self._new_epoch()
        song = self.queue.pop(0)
        last_start = int(self.data.lengths[song]) - 2  # the last offset that leaves a target
        self.lane_song[lane] = song
        self.lane_offset[lane] = self.rng.integers(0, last_start + 1) if random_point else 0
        self.lane_shift[lane] = draw_shifts(self.lowest[[song]], self.highest[[song]], self.max_transpose, self.rng)[0]

    def __next__(self) -> Batch:
        if self.started:
            self.lane_offset += self.context
        new_song = self._finished()  # every lane before the first batch
        for lane in np.flatnonzero(new_song):
            self._start(int(lane), random_point=not self.started)
        self.started = True
        return self._batch(new_song)
