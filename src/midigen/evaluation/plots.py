"""One small plot per metric: the kernel density of the generated set's values, and of the reference's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from midigen.evaluation.metrics import METRICS, densities_on_grid, metric_values
from midigen.evaluation.render import DPI, save_figure

COLUMNS = 4
PANEL_WIDTH_PX = 320
PANEL_HEIGHT_PX = 220
SETS = (("generated", "#1f77b4"), ("reference", "#ff7f0e"))


def plot_metric_distributions(result: dict[str, Any], png_path: str | Path) -> Path:
    """Plot `compare_sets(...)` (both sets, with overlap area and KL in each title) or `measure_set(...)`."""
    sets = {name: result[name] for name, _ in SETS if name in result} or {"generated": result}
    rows = math.ceil(len(METRICS) / COLUMNS)
    size = (COLUMNS * PANEL_WIDTH_PX / DPI, rows * PANEL_HEIGHT_PX / DPI)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    for index, metric in enumerate(METRICS):
        axes = figure.add_subplot(rows, COLUMNS, index + 1)
        names = [name for name, _ in SETS if name in sets and metric_values(sets[name]["pieces"], metric).size]
        if not names:
            axes.set_title(f"{metric}\n(no values)", fontsize=8)
            continue
        values = [metric_values(sets[name]["pieces"], metric) for name in names]
        grid, densities = densities_on_grid(values)
        for name, set_values, density in zip(names, values, densities):
            colour = dict(SETS)[name]
            axes.plot(grid, density, color=colour, label=f"{name} ({set_values.size})")
            axes.plot(set_values, [0] * set_values.size, "|", color=colour, markersize=8)
        comparison = result.get("comparison", {}).get(metric)
        scores = f"\nOA {comparison['overlap_area']:.2f}  KL {comparison['kl_divergence']:.2f}" if comparison else ""
        axes.set_title(metric + scores, fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_yticks([])
    figure.axes[0].legend(fontsize=7)
    return save_figure(figure, png_path)
