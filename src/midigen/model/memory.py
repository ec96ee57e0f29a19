"""Long-term memory: the Transformer-XL cache and the kNN memory (Memorizing Transformers).

Both are kept per batch lane and cleared when that lane's song ends, so songs never leak into
each other. `MemoryState.forward` runs one segment with memory and then writes the segment into it.

kNN search is exact inner product on unit vectors. On the CPU it is one faiss call per step for
all lanes and heads: an IVF-flat index whose inverted lists are the (lane, head) stores, searched
with every query pre-assigned to its own list. Each list is a ring buffer of `capacity` entries
(first in, first out). On a GPU the same exact search runs as batched matrix products in torch,
where the memory then lives, so nothing crosses to the CPU (GPU faiss is not used).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from midigen.errors import MidigenError
from midigen.model.config import ModelConfig
from midigen.model.transformer import KV, ModelOutput

log = logging.getLogger(__name__)
SEARCH_CHUNK_ELEMENTS = 2**26  # bounds the score matrix of the torch search


@functools.cache
def announce_search(backend: str, device: torch.device) -> None:
    """Say once per process, not at every validation, which search the kNN memory uses."""
    log.info("kNN memory: exact search with %s on %s", backend, device)


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
        self.lanes, self.heads, self.head_dim = lanes, heads, head_dim
        self.capacity, self.top_k = capacity, top_k
        if backend == "auto":
            backend = "faiss" if device.type == "cpu" else "torch"
        self.backend = backend
        self.device = device if backend == "torch" else torch.device("cpu")
        self.keys = torch.zeros(lanes, heads, capacity, head_dim, device=self.device)  # (B, H, C, D)
        self.values = torch.zeros_like(self.keys)
        self.written = torch.zeros(lanes, dtype=torch.long)  # entries ever written per lane (ring position)
        self.index: faiss.IndexIVFFlat | None = None
        if backend == "faiss":
            self.quantizer = faiss.IndexFlatIP(head_dim)  # unused: queries come pre-assigned to their list
            self.index = faiss.IndexIVFFlat(self.quantizer, head_dim, lanes * heads, faiss.METRIC_INNER_PRODUCT)
            self.index.is_trained = True
        announce_search(backend, self.device)

    def sizes(self) -> Tensor:
        return self.written.clamp(max=self.capacity)

    def clear(self, lanes: Tensor) -> None:
        for lane in torch.nonzero(lanes.cpu()).flatten().tolist():
            self.written[lane] = 0
            if self.index is not None:
                for head in range(self.heads):
                    self.index.invlists.resize(lane * self.heads + head, 0)
        self._sync_total()

    def write(self, keys: Tensor, values: Tensor, valid: Tensor) -> None:
        """Append each lane's valid tokens: keys/values (B, H, T, D), valid (B, T)."""
        keys = keys.detach().to(self.device, torch.float32)
        values = values.detach().to(self.device, torch.float32)
        valid = valid.cpu()
        for lane in range(self.lanes):
            positions = torch.nonzero(valid[lane]).flatten()
            if positions.numel() == 0:
                continue
            positions = positions[-self.capacity :]  # a segment longer than the store keeps its newest tokens
            start = int(self.written[lane])
            slots = (start + torch.arange(positions.numel())) % self.capacity
            self.keys[lane][:, slots] = keys[lane][:, positions.to(self.device)]
            self.values[lane][:, slots] = values[lane][:, positions.to(self.device)]
            if self.index is not None:
                self._write_lists(lane, slots.numpy())
            self.written[lane] += positions.numel()
        self._sync_total()

    def _write_lists(self, lane: int, slots: np.ndarray) -> None:
        """Mirror the ring buffer into the lane's faiss lists (append while filling, then overwrite)."""
        invlists = self.index.invlists  # type: ignore[union-attr]
        for head in range(self.heads):
            group = lane * self.heads + head
            codes = np.ascontiguousarray(self.keys[lane, head, slots].numpy())
            ids = slots.astype(np.int64)
            size = invlists.list_size(group)
            if size < self.capacity:  # still filling: slots continue the list
                fill = min(len(slots), self.capacity - size)
                invlists.add_entries(group, fill, faiss.swig_ptr(ids[:fill]), faiss.swig_ptr(codes[:fill].view(np.uint8)))
                ids, codes = ids[fill:], codes[fill:]
            for offset, count in _ring_runs(ids):
                invlists.update_entries(group, int(ids[offset]), count, faiss.swig_ptr(ids[offset : offset + count]),
                                        faiss.swig_ptr(np.ascontiguousarray(codes[offset : offset + count]).view(np.uint8)))

    def state_dict(self) -> dict[str, Any]:
        used = int(self.sizes().max())
        # copies of the filled slots only: torch.save would write a view's whole storage
        return {"written": self.written.clone(), "keys": self.keys[:, :, :used].clone().cpu(),
                "values": self.values[:, :, :used].clone().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys, values, written = state["keys"], state["values"], state["written"]
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.head_dim or keys.shape[2] > self.capacity:
            raise MidigenError(f"saved kNN memory of shape {tuple(keys.shape)} does not fit {tuple(self.keys.shape)}")
        self.clear(torch.ones(self.lanes, dtype=torch.bool))
        used = keys.shape[2]
        self.keys[:, :, :used] = keys.to(self.device)
        self.values[:, :, :used] = values.to(self.device)
        self.written = written.clone()
        if self.index is not None:  # the lists, emptied above, take every filled slot in order
            for lane, size in enumerate(self.sizes().tolist()):
                self._write_lists(lane, np.arange(size))
        self._sync_total()

    def _sync_total(self) -> None:
        if self.index is not None:
            self.index.ntotal = int(self.sizes().sum()) * self.heads

    @torch.compiler.disable  # host-side bookkeeping and a faiss call: torch.compile runs it as it is
    def search(self, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """queries (B, H, T, D), unit length → keys, values (B, H, T, K, D) and valid (B, H, T, K)."""
        B, H, T, D = queries.shape
        k = min(self.top_k, self.capacity)
        if int(self.written.max()) == 0:
            empty = queries.new_zeros(B, H, T, k, D)
            return empty, empty, torch.zeros(B, H, T, k, dtype=torch.bool, device=queries.device)
        if self.backend == "faiss":
            slots = self._search_faiss(queries, k)
        else:
            slots = self._search_torch(queries, k)
        valid = slots >= 0  # (B, H, T, K)
        # whole rows of the (B·H·C, D) stores: far cheaper than an element-wise gather
        lists = torch.arange(B * H, device=slots.device).view(B, H, 1, 1) * self.capacity
        rows = (lists + slots.clamp(min=0)).flatten().to(self.device)
        keys = self.keys.view(-1, D).index_select(0, rows).view(B, H, T, k, D)
        values = self.values.view(-1, D).index_select(0, rows).view(B, H, T, k, D)
        target = queries.device
        return keys.to(target), values.to(target), valid.to(target)

    def _search_faiss(self, queries: Tensor, k: int) -> Tensor:
        B, H, T, D = queries.shape
        flat = np.ascontiguousarray(queries.detach().float().cpu().numpy().reshape(B * H * T, D))
        lists = np.repeat(np.arange(B * H, dtype=np.int64), T).reshape(-1, 1)
        self.index.nprobe = 1  # type: ignore[union-attr]
        _, ids = self.index.search_preassigned(flat, k, lists, np.zeros(lists.shape, np.float32))  # type: ignore[union-attr]
        return torch.from_numpy(ids).view(B, H, T, k)

    def _search_torch(self, queries: Tensor, k: int) -> Tensor:
        B, H, T, D = queries.shape
        queries = queries.detach().to(self.device, torch.float32)
        used = int(self.sizes().max())  # slots past every lane's size hold nothing
        keys = self.keys[:, :, :used]
        filled = torch.arange(used, device=self.device) < self.sizes().to(self.device).view(B, 1, 1, 1)
        chunk = max(1, SEARCH_CHUNK_ELEMENTS // (B * H * used))
        found = []
        for first in range(0, T, chunk):
            scores = torch.einsum("bhtd,bhcd->bhtc", queries[:, :, first : first + chunk], keys)
            scores = scores.masked_fill(~filled, float("-inf"))
            top, slots = scores.topk(min(k, used), dim=-1)
            found.append(slots.masked_fill(top == float("-inf"), -1))
        slots = torch.cat(found, dim=2)
        return torch.nn.functional.pad(slots, (0, k - slots.shape[-1]), value=-1)  # fewer entries than k: none


def _ring_runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """Split ring slots into runs of consecutive slots: (offset in `slots`, length)."""
    if slots.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [slots.size]))
    return list(zip(starts.tolist(), (ends - starts).tolist()))


class MemoryState:
    """The memories of a batch of lanes, for a model trained with `memory` = none, xl or knn."""

    def __init__(self, config: ModelConfig, lanes: int, device: torch.device, knn_backend: str = "auto") -> None:
        self.config, self.device = config, device
        self.xl = XLMemory(config.memory_length) if config.memory != "none" else None
        self.knn = None
        if config.memory == "knn":
            self.knn = KnnMemory(lanes, config.n_heads, config.head_dim, config.knn_capacity, config.knn_top_k,
                                 device, knn_backend)

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
        tokens: Tensor,
        bars: Tensor,
        beats: Tensor,
        targets: Tensor | None = None,
        new_song: Tensor | None = None,
    ) -> ModelOutput:
        """One segment (B, T) with memory; lanes flagged in `new_song` (B,) forget their past first."""
        if new_song is not None:
            self.reset(new_song)
        past = self.xl.past() if self.xl is not None else None
        output = model(tokens, bars, beats, targets=targets, past=past, knn=self.knn)
        self.remember(output.present, tokens != 0)
        return output

    def remember(self, present: list[KV], valid: Tensor) -> None:
        """Write a finished segment (valid (B, T): False for padding) into the memories."""
        if self.xl is not None:
            self.xl.push(present, valid)
        if self.knn is not None:
            layer = present[self.config.knn_layer_index]  # type: ignore[index]
            self.knn.write(layer.keys, layer.values, valid)
