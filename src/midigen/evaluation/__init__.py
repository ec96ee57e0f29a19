"""Judging models and their music: NLL (`nll`), objective musical metrics (`metrics`), piano rolls and
audio (`render`), and plots of metric distributions (`plots`)."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: matplotlib and torch take most of a second to import, and most callers need neither.
_EXPORTS = {
    "piece_metrics": "metrics",
    "measure_set": "metrics",
    "compare_sets": "metrics",
    "render_piano_roll": "render",
    "render_wav": "render",
    "find_soundfont": "render",
    "plot_metric_distributions": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
