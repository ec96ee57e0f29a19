"""Files that hold tensors and state without pickle: safetensors for tensors, JSON for everything else.

A model, a run or its training state may come from someone else, so reading one must never run code.
`save_state` writes a nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays: an
optimiser's or a sampler's `state_dict`) as one safetensors file: the tensors by name, and the structure
as JSON in the file's metadata, where each tensor is replaced by a reference to its name.
`load_state` reads it back and refuses, with one line naming the file, anything it cannot read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from midigen.errors import MidigenError
from midigen.io_utils import atomic_path

STATE_KEY = "midigen.state"  # the metadata entry that holds the JSON structure
TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    """JSON for `value`, its tensors moved into `tensors` under fresh names."""
    if isinstance(value, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()  # a view would not own its storage
        return {TENSOR: name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {ARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a state file")


def _decode(node: Any, tensors: dict[str, Tensor], path: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and next(iter(node)).startswith("__"):
        (marker, inner), = node.items()
        if marker in (TENSOR, ARRAY):
            if not isinstance(inner, str) or inner not in tensors:
                raise MidigenError(f"{path}: damaged state file (it refers to a missing tensor {inner!r})")
            return tensors[inner] if marker == TENSOR else tensors[inner].numpy()
        if marker == TUPLE and isinstance(inner, list):
            return tuple(_decode(v, tensors, path) for v in inner)
        if marker == ITEMS and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
            return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in inner}
        raise MidigenError(f"{path}: damaged state file (unknown entry {marker!r})")
    return {k: _decode(v, tensors, path) for k, v in node.items()}


def save_state(path: str | Path, state: Any, tensors: dict[str, Tensor] | None = None) -> None:
    """Write `state` to `path` atomically; `tensors` are stored as they are, under their own names (weights)."""
    from safetensors.torch import save_file

    stored = {name: t.detach().cpu().contiguous() for name, t in (tensors or {}).items()}
    nested: dict[str, Tensor] = {}
    structure = json.dumps(_encode(state, nested))
    clash = set(stored) & set(nested)
    if clash:
        raise ValueError(f"tensor names {sorted(clash)} are used twice")
    with atomic_path(path) as tmp:
        save_file(stored | nested, str(tmp), metadata={STATE_KEY: structure})


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata, or one line saying why the file cannot be read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MidigenError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise MidigenError(f"{path}: empty file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types, and OSError, for foreign or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MidigenError(f"{path}: not a safetensors file ({reason})") from None
    return tensors, metadata


def load_state(path: str | Path) -> tuple[Any, dict[str, Tensor]]:
    """The state saved by `save_state` at `path`, and the tensors saved under their own names."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if STATE_KEY not in metadata:
        raise MidigenError(f"{path}: not a midigen state file")
    try:
        structure = json.loads(metadata[STATE_KEY])
    except json.JSONDecodeError as exc:
        raise MidigenError(f"{path}: damaged state file ({exc})") from None
    state = _decode(structure, tensors, path)
    referenced = set(_references(structure))
    return state, {name: t for name, t in tensors.items() if name not in referenced}


def _references(node: Any) -> list[str]:
    if isinstance(node, list):
        return [name for v in node for name in _references(v)]
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in (TENSOR, ARRAY) and isinstance(next(iter(node.values())), str):
            return [next(iter(node.values()))]
        return [name for v in node.values() for name in _references(v)]
    return []


def unique_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state dict without the second name of a shared tensor (a tied output head)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor
    return unique


def load_weights(module: torch.nn.Module, weights: dict[str, Tensor], path: str | Path) -> None:
    """Load `weights` into `module` after checking that every name, shape and dtype is what the module expects."""
    expected = unique_state(module)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + (
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise MidigenError(f"{path}: weights do not fit the model config ({detail})")
    for name, tensor in expected.items():
        found = weights[name]
        if found.shape != tensor.shape or found.dtype != tensor.dtype:
            raise MidigenError(f"{path}: weight {name} is {found.dtype} {tuple(found.shape)}, the model config needs "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        if found.is_floating_point() and not bool(torch.isfinite(found).all()):
            raise MidigenError(f"{path}: weight {name} holds NaN or infinite values")
    module.load_state_dict(weights, strict=False)  # only the shared names are absent, as checked above
