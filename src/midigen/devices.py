"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from midigen.errors import MidigenError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA where there is a GPU), `cpu`, `cuda` (this process's local rank) or `cuda:N`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MidigenError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise MidigenError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")
