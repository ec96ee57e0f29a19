"""Long-term memory: the Transformer-XL cache and the kNN memory (Memorizing Transformers).

Both are kept per batch lane and cleared when that lane's song ends, so songs never leak into
each other. `MemoryState.forward` runs one segment with memory and then writes the segment into it;
the kNN memory receives tokens as they leave the XL window, so it holds only what local attention
can no longer see.

kNN search is exact inner product on unit vectors, for all lanes and heads at once. Each
(lane, head) store is a ring buffer of `capacity` entries (first in, first out). Search works as
faiss's own exact search does: inner products by batched matrix products (BLAS), a block of slots
at a time, and the top k of each query kept in faiss's heaps (one multithreaded call per block
and lane; a lane joins only the blocks that hold its entries).
On a GPU the memory lives there and torch's top-k selects, so nothing crosses to the CPU (GPU faiss
is not used). faiss's IVF index, with one inverted list per (lane, head) and every query
pre-assigned to its list, gives the same answer but scans each list once per query: 3-5 times
slower here. A search hands back the rows of its neighbours in the store, not copies of them: the
kNN layer reads them there, which is why writes wait until the store is next read.
"""

from __future__ import annotations

from collections.abc import Mapping

import functools
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

# after torch: in a process that imported faiss first, the search took 8× as long (130 ms a training step, not 16)
import faiss

from midigen.errors import MidigenError
from midigen.model.config import ModelConfig
from midigen.model.transformer import KV, ModelOutput, Neighbours

log = logging.getLogger(__name__)
if list(sys.modules).index("faiss") < list(sys.modules).index("torch"):  # the caller imported faiss first
    warnings.warn("faiss was imported before torch, which can make the kNN memory's search several times slower; "
                  "import torch or midigen before faiss", stacklevel=2)
# scores per block (float32, 64 MB), which bounds memory. Large blocks search fastest: torch merges each block's
# top k with a further topk, and faiss's heaps start from a floor found in the first block (`score_floor`)
SCORE_BLOCK_ELEMENTS = 2**24
UNEVEN_BLOCK_SLOTS = 1024  # slots per block when lanes hold different amounts (see `KnnMemory._score_blocks`)


@functools.cache
def announce_search(backend: str, device: torch.device) -> None:
    """Say once per process, not at every validation, which search the kNN memory uses."""
    log.info("kNN memory: exact search with %s on %s", backend, device)


def min_heaps(rows: int, k: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """faiss's min-heaps of k (score, id) entries per row over new arrays, every entry empty (score −inf, id −1)."""
    scores = np.empty((rows, k), dtype=np.float32)
    ids = np.empty((rows, k), dtype=np.int64)
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k, heaps.val, heaps.ids = rows, k, faiss.swig_ptr(scores), faiss.swig_ptr(ids)
    heaps.heapify()
    return scores, ids, heaps


def score_floor(block: Tensor, k: int) -> np.ndarray | None:
    """A score that at least k entries of each row of `block` (rows, S) reach: the k-th largest of the maxima of
    2k + 1 groups of slots (rows, 1); None for a block of fewer slots.

    Heaps started just below it take in only the entries above it: most of their time went on entries that later
    ones pushed out again. Slot s is in group s mod G, so that the maxima are one vectorised pass; G is odd, so that
    a memory that repeats every 2^n tokens does not put the copies of one token in one group.
    """
    rows, width = block.shape
    groups = 2 * k + 1
    if width < groups:
        return None
    maxima = block[:, : width // groups * groups].view(rows, -1, groups).amax(1)  # (rows, G)
    maxima = np.ascontiguousarray(maxima.numpy())
    top, _, heaps = min_heaps(rows, k)
    heaps.addn(groups, faiss.swig_ptr(maxima), 0)
    return top[:, :1]  # each heap's root: the least of the k largest maxima


class XLMemory:
    """Per layer, the keys/values of each lane's most recent `length` tokens (detached)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.layers: list[KV] | None = None

    def past(self) -> list[KV] | None:
        return self.layers

    def reset(self, lanes: Tensor) -> None:
        """Forget everything of the lanes where `lanes` (B,) is True."""
        if self.layers is not None and bool(lanes.any()):
            for kv in self.layers:
                kv.valid[lanes] = False

    def leaving(self, layer: int, present: KV, valid: Tensor) -> KV | None:
        """The tokens of `layer` that pushing a segment with these keys/values moves out of the window."""
        arriving = KV(present.keys.detach(), present.values.detach(), valid)
        tokens = arriving if self.layers is None else self.layers[layer].then(arriving)
        count = tokens.length - self.length
        return tokens.first(count) if count > 0 else None

    def push(self, present: list[KV], valid: Tensor) -> None:
        """Append a segment's keys/values (valid (B, T): False for padding) and keep the newest `length`."""
        fresh = [KV(kv.keys.detach(), kv.values.detach(), valid) for kv in present]
        if self.layers is not None and valid.shape[1] < self.length:  # a short segment keeps some old tokens
            fresh = [old.then(new) for old, new in zip(self.layers, fresh)]
        self.layers = [kv.last(self.length) for kv in fresh]

    def state_dict(self) -> dict[str, Any]:
        # copies: the window is a view into larger tensors, whose whole storage torch.save would write
        layers = None if self.layers is None else [(kv.keys.clone(), kv.values.clone(), kv.valid.clone())
                                                   for kv in self.layers]
        return {"layers": layers}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        layers = state["layers"]
        self.layers = None if layers is None else [KV(*(t.to(device) for t in kv)) for kv in layers]


class KnnMemory:
    """Every past key/value of each lane's current song, per head, searchable by similarity."""

    def __init__(self, lanes: int, heads: int, head_dim: int, capacity: int, top_k: int, device: torch.device,
                 backend: str = "auto") -> None:
        self.lanes, self.head_dim = lanes, head_dim
        self.capacity, self.top_k = capacity, top_k
        if backend == "auto":
            backend = "faiss" if device.type == "cpu" else "torch"
        if backend == "faiss" and device.type != "cpu":
            raise MidigenError(f"the faiss search runs on the CPU; a kNN memory on {device} searches with torch")
        self.backend, self.device = backend, device
        self.keys = torch.zeros(lanes, heads, capacity, head_dim, device=device)  # (B, H, C, D)
        self.values = torch.zeros_like(self.keys)
        self.written = torch.zeros(lanes, dtype=torch.long)  # entries ever written per lane (ring position)
        self.staged: list[tuple[Tensor, Tensor, Tensor]] = []  # written, not yet in the store
        announce_search(backend, device)

    def sizes(self) -> Tensor:
        self._store_staged()
        return self.written.clamp(max=self.capacity)

    def clear(self, lanes: Tensor) -> None:
        self._store_staged()
        self.written[lanes.cpu()] = 0

    def write(self, keys: Tensor, values: Tensor, valid: Tensor) -> None:
        """Append each lane's valid tokens: keys/values (B, H, T, D), valid (B, T). Keys are stored at unit length.

        They reach the store when it is next read: until then the backward pass of the segment searched last
        reads that segment's neighbours from the store (`Neighbours`), which evicting entries would change.
        """
        self.staged.append((keys.detach(), values.detach(), valid))

    def _store_staged(self) -> None:
        staged, self.staged = self.staged, []
        for keys, values, valid in staged:
            valid = valid.cpu()
            counts = valid.sum(1)  # (B,)
            dropped = (counts - self.capacity).clamp(min=0)  # a segment longer than the store keeps its newest tokens
            rank = valid.cumsum(1) - 1 - dropped.unsqueeze(1)  # (B, T) place of each token among those kept
            lanes, positions = torch.nonzero(valid & (rank >= 0), as_tuple=True)
            slots = (self.written[lanes] + rank[lanes, positions]) % self.capacity
            lanes, positions, slots = (t.to(self.device) for t in (lanes, positions, slots))
            keys = torch.nn.functional.normalize(keys[lanes, :, positions].to(self.device, torch.float32), dim=-1)
            self.keys[lanes, :, slots] = keys  # (N, H, D): one entry per kept token, for every head
            self.values[lanes, :, slots] = values[lanes, :, positions].to(self.device, torch.float32)
            self.written += counts - dropped

    def select(self, lanes: Tensor) -> None:
        """Keep only `lanes` (L,) long, in that order: a generation drops its lanes that have finished."""
        self._store_staged()
        self.keys, self.values = self.keys[lanes.to(self.device)], self.values[lanes.to(self.device)]
        self.written = self.written[lanes.cpu()]
        self.lanes = len(lanes)

    @classmethod
    def stacked(cls, memories: list[KnnMemory]) -> KnnMemory:
        """One memory holding the lanes of `memories`, in order: a generation fills each prompt's alone first."""
        first = memories[0]
        stacked = cls(0, first.keys.shape[1], first.head_dim, first.capacity, first.top_k, first.device, first.backend)
        for memory in memories:
            memory._store_staged()
        stacked.keys = torch.cat([memory.keys for memory in memories])
        stacked.values = torch.cat([memory.values for memory in memories])
        stacked.written = torch.cat([memory.written for memory in memories])
        stacked.lanes = len(stacked.written)
        return stacked

    def state_dict(self) -> dict[str, Any]:
        used = int(self.sizes().max())  # stores what is staged first
        # copies of the filled slots only: torch.save would write a view's whole storage
        return {"written": self.written.clone(), "keys": self.keys[:, :, :used].clone().cpu(),
                "values": self.values[:, :, :used].clone().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys, values, written = state["keys"], state["values"], state["written"]
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.head_dim or keys.shape[2] > self.capacity:
            raise MidigenError(f"saved kNN memory of shape {tuple(keys.shape)} does not fit {tuple(self.keys.shape)}")
        used = keys.shape[2]
        self.staged = []
        self.keys[:, :, :used] = keys.to(self.device)
        self.values[:, :, :used] = values.to(self.device)
        self.written = written.clone()

    @torch.compiler.disable  # host-side bookkeeping and a faiss call: torch.compile runs it as it is
    def search(self, queries: Tensor) -> Neighbours:
        """queries (B, H, T, D), unit length → the top k entries of each query's lane and head."""
        self._store_staged()
        B, H, T, D = queries.shape
        k = min(self.top_k, self.capacity)
        stores = self.keys.view(-1, D), self.values.view(-1, D)  # (B·H·C, D)
        if int(self.written.max()) == 0:
            nothing = torch.zeros(B, H, T, k, dtype=torch.long, device=self.device)
            return Neighbours(nothing.float().to(queries.device), nothing, nothing.bool().to(queries.device), *stores)
        select = self._select_faiss if self.backend == "faiss" else self._select_torch
        # float32 scores under bf16 autocast too (the trainer's on CUDA): in bf16 the top k would be approximate
        with torch.autocast(self.device.type, enabled=False):
            scores, slots = select(self._score_blocks(queries), B, H * T, k)
        slots = slots.view(B, H, T, k).to(self.device)
        valid = slots >= 0
        lists = torch.arange(B * H, device=self.device).view(B, H, 1, 1) * self.capacity
        rows = lists + slots.clamp(min=0)  # (B, H, T, K) rows of the (B·H·C, D) stores
        scores = scores.view(B, H, T, k).to(self.device).masked_fill(~valid, 0.0)  # finite, or gradients turn NaN
        return Neighbours(scores.to(queries.device), rows, valid.to(queries.device), *stores)

    def _score_blocks(self, queries: Tensor) -> Iterator[tuple[int, list[int], Tensor]]:
        """Inner products with the stored keys, a block of slots at a time, for the lanes with entries in it:
        (first slot, those lanes, scores (lanes·H·T, S)).

        A lane's slots past its size score −inf. Blocks bound the score matrix however large the store. Lanes
        holding different amounts (contiguous batching: one lane deep in a long piece, the others early in short
        ones) get finer blocks, so that each stops near its own end instead of the fullest lane's: a quarter of
        the work on the bench's long pieces.
        """
        B, H, T, D = queries.shape
        queries = queries.detach().to(self.device, torch.float32)
        sizes = self.sizes().tolist()
        used = max(sizes)  # slots past every lane's size hold nothing
        block = max(1, SCORE_BLOCK_ELEMENTS // (B * H * T))
        if min(sizes) < used:
            block = min(block, UNEVEN_BLOCK_SLOTS)
        for first in range(0, used, block):
            last = min(used, first + block)
            lanes = [lane for lane, size in enumerate(sizes) if size > first]
            index = torch.tensor(lanes, device=self.device)
            keys = self.keys[index, :, first:last]  # (L, H, S, D)
            scores = torch.matmul(queries[index], keys.transpose(-1, -2))  # (L, H, T, S)
            for row, lane in enumerate(lanes):  # only the unfilled tails: far less to write than a mask
                if sizes[lane] < last:
                    scores[row, :, :, sizes[lane] - first :] = float("-inf")
            yield first, lanes, scores.view(-1, last - first)

    @staticmethod
    def _select_faiss(blocks: Iterator[tuple[int, list[int], Tensor]], lanes: int, rows_per_lane: int, k: int
                      ) -> tuple[Tensor, Tensor]:
        """Top-k scores and slots of each row with faiss's heaps (multithreaded C++), as its own exact search does."""
        scores, slots, heaps = min_heaps(lanes * rows_per_lane, k)  # min-heaps keep the k largest inner products
        for first, block_lanes, block in blocks:
            floor = score_floor(block, k) if first == 0 else None
            if floor is not None:
                with np.errstate(over="ignore"):  # a lane with fewer than k entries has floor −inf, which stays
                    floor = np.nextafter(floor, np.float32(-np.inf)).reshape(len(block_lanes), rows_per_lane, 1)
                scores.reshape(lanes, rows_per_lane, k)[block_lanes] = floor
            block = np.ascontiguousarray(block.numpy())
            for row, lane in enumerate(block_lanes):
                lane_block = block[row * rows_per_lane : (row + 1) * rows_per_lane]
                heaps.addn(block.shape[1], faiss.swig_ptr(lane_block), first, lane * rows_per_lane, rows_per_lane)
        return torch.from_numpy(scores), torch.from_numpy(slots)

    def _select_torch(self, blocks: Iterator[tuple[int, list[int], Tensor]], lanes: int, rows_per_lane: int, k: int
                      ) -> tuple[Tensor, Tensor]:
        """Top-k scores and slots of each row with torch (on the GPU, where the memory then lives), merged block by block."""
        best_scores = torch.full((lanes * rows_per_lane, k), float("-inf"), device=self.device)  # empty: −inf, slot −1
        best_slots = torch.full((lanes * rows_per_lane, k), -1, dtype=torch.long, device=self.device)
        for first, block_lanes, block in blocks:
            rows = (torch.tensor(block_lanes, device=self.device).view(-1, 1) * rows_per_lane
                    + torch.arange(rows_per_lane, device=self.device)).view(-1)
            top, slots = block.topk(min(k, block.shape[1]), dim=-1)
            slots = (slots + first).masked_fill(top == float("-inf"), -1)
            top, slots = torch.cat([best_scores[rows], top], 1), torch.cat([best_slots[rows], slots], 1)
            top, order = top.topk(k, dim=-1)
            best_scores[rows], best_slots[rows] = top, slots.gather(1, order)
        return best_scores, best_slots


def knn_store_bytes(config: ModelConfig, lanes: int) -> int:
    """Memory taken by the kNN stores of `lanes` lanes when full: float32 keys and values."""
    return 2 * 4 * lanes * config.n_heads * config.knn_capacity * config.head_dim


def knn_store_device(location: str, config: ModelConfig, lanes: int, device: torch.device) -> torch.device:
    """Where the kNN stores of training live for a model on `device`, by `--data-location`: on the GPU with `gpu`, in
    CPU memory with `cpu` or `memmap`; `auto`: on the GPU when full stores for training and for validation (as many
    lanes) together take under a quarter of its free memory, else in CPU memory (searched there with faiss). A model
    without kNN memory has no stores: `device`, without asking the GPU."""
    if config.memory != "knn":
        return device
    if device.type != "cuda" or location in ("cpu", "memmap"):
        return torch.device("cpu")
    if location == "gpu" or 2 * knn_store_bytes(config, lanes) < torch.cuda.mem_get_info(device)[0] / 4:
        return device
    return torch.device("cpu")


class MemoryState:
    """The memories of a batch of lanes, for a model trained with `memory` = none, xl or knn.

    The XL memory lives with the model on `device`; the kNN stores on `knn_device` (default `device`).
    """

    def __init__(self, config: ModelConfig, lanes: int, device: torch.device, knn_device: torch.device | None = None
                 ) -> None:
        self.config, self.device = config, device
        self.xl = XLMemory(config.memory_length) if config.memory != "none" else None
        self.knn = None
        if config.memory == "knn":
            self.knn = KnnMemory(lanes, config.n_heads, config.head_dim, config.knn_capacity, config.knn_top_k,
                                 knn_device or device)

    def reset(self, lanes: Tensor) -> None:
        if self.xl is not None:
            self.xl.reset(lanes)
        if self.knn is not None:
            self.knn.clear(lanes)

    def state_dict(self) -> dict[str, Any]:
        """Everything the lanes remember, so that a resumed training run goes on exactly."""
        return {"xl": self.xl.state_dict() if self.xl is not None else None,
                "knn": self.knn.state_dict() if self.knn is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.xl is not None and state["xl"] is not None:
            self.xl.load_state_dict(state["xl"], self.device)
        if self.knn is not None and state["knn"] is not None:
            self.knn.load_state_dict(state["knn"])

    def forward(
        self,
        model: torch.nn.Module,
        tokens: Tensor,  # (B, T)
        features: Mapping[str, Tensor],  # name → (B, T)
        targets: Tensor | None = None,
        new_song: Tensor | None = None,
    ) -> ModelOutput:
        """One segment (B, T) with memory; lanes flagged in `new_song` (B,) forget their past first."""
        if new_song is not None:
            self.reset(new_song)
        past = self.xl.past() if self.xl is not None else None
        output = model(tokens, features, targets=targets, past=past, knn=self.knn)
        self.remember(output.present, tokens != 0)
        return output

    def remember(self, present: list[KV], valid: Tensor) -> None:
        """Write a finished segment (valid (B, T): False for padding) into the memories.

        The kNN memory takes the tokens that leave the XL window: until then local attention sees them,
        with their positions, and retrieving them too would only repeat it.
        """
        if self.knn is not None and self.xl is not None:
            layer = self.config.knn_layer_index
            leaving = self.xl.leaving(layer, present[layer], valid)  # type: ignore[arg-type, index]
            if leaving is not None:
                self.knn.write(leaving.keys, leaving.values, leaving.valid)
        if self.xl is not None:
            self.xl.push(present, valid)
