"""Device choice and PyTorch DDP set-up under `torchrun` (NCCL on GPU, gloo on CPU), and how the ranks share
the work: each takes its own songs, and validation figures are summed over the ranks."""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from midigen.devices import resolve_device


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> Distributed:
    """One process per device under torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Distributed(dist.get_rank(), world_size, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def balanced_shares(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split the positions of `sizes` into `parts` disjoint shares that cover them all, with totals as even as
    greedy allows (largest first, each to the share that holds least), each share in ascending order.

    Every rank computes all the shares and takes its own, so the ranks agree without talking."""
    if parts == 1:  # one process without accumulation: no sort (its keys cost ~100 bytes a song on a large store)
        return [list(range(len(sizes)))]
    shares: list[list[int]] = [[] for _ in range(parts)]
    lightest = [(0, part) for part in range(parts)]  # (total size, share)
    for position in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, part = heapq.heappop(lightest)
        shares[part].append(position)
        heapq.heappush(lightest, (total + int(sizes[position]), part))
    return [sorted(share) for share in shares]


def all_reduce_sums(values: Sequence[float], ranks: Distributed) -> list[float]:
    """The sums over all ranks of each of `values` (in float64, so that sums of many NLLs stay exact enough);
    the values themselves in a single process. Every rank must call it, in the same order."""
    if not ranks.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
