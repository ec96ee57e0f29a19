"""The music transformer and its memories."""

from __future__ import annotations

import importlib
from typing import Any

from midigen.model.config import MEMORY_MODES, PRESETS, ModelConfig

# The modules that need torch are imported on first use, so the command line starts fast.
_EXPORTS = {"KV": "transformer", "ModelOutput": "transformer", "MusicTransformer": "transformer", "MemoryState": "memory"}

__all__ = ["MEMORY_MODES", "PRESETS", "ModelConfig", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
