"""The models the studio offers: run or model folders named on its command line, and the ones inside
folders named there (a folder of models), each under its folder's name.

A name from a client is only ever looked up among the folders found this way, never joined to a path, so
no name can reach a folder outside them. Models load on first use and stay loaded.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from midigen.errors import MidigenError
from midigen.inference.model_files import CHECKPOINT_FILE, CONFIG_FILE, LoadedModel, load_model

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LOSS_PLOT_FILE = "loss.png"  # what training draws in a run folder


def is_model_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


class ModelShelf:
    """Models by name, found in `places` (each a run or model folder, or a folder of them)."""

    def __init__(self, places: Sequence[str | Path], device: str = "auto") -> None:
        self.places = [Path(place) for place in places]
        for place in self.places:
            if not place.is_dir():
                raise MidigenError(f"{place}: not a run or model folder, nor a folder of them")
        self.device = device
        self._loaded: dict[Path, LoadedModel] = {}
        self._lock = threading.Lock()

    def folders(self) -> dict[str, Path]:
        """Each model's name and folder, looked for afresh (models added to a folder of models appear)."""
        found: dict[str, Path] = {}
        for place in self.places:
            candidates = [place] if is_model_folder(place) else sorted(p for p in place.iterdir() if p.is_dir())
            for folder in candidates:
                if not is_model_folder(folder) or not NAME.fullmatch(folder.name):
                    continue
                name, copy = folder.name, 1
                while name in found:  # two folders of one name in different places
                    copy += 1
                    name = f"{folder.name}-{copy}"
                found[name] = folder
        return found

    def folder(self, name: str) -> Path:
        """The folder of the model called `name`; a one-line `MidigenError` for any other name."""
        folders = self.folders()
        if name not in folders:
            known = ", ".join(folders) or "none"
            shown = name if NAME.fullmatch(name) else repr(name[:60])
            raise MidigenError(f"model: no model called {shown} (the studio offers: {known})")
        return folders[name]

    def load(self, name: str) -> LoadedModel:
        """The model called `name`, loaded once; one that does not load (yet: a run may be writing its first
        checkpoint) gives its one-line error, and is tried again next time."""
        folder = self.folder(name)
        with self._lock:
            if folder not in self._loaded:
                try:
                    self._loaded[folder] = load_model(folder, self.device)
                except MidigenError as exc:
                    raise MidigenError(f"model {name}: {exc}") from None
            return self._loaded[folder]

    def loss_plot(self, name: str) -> Path | None:
        plot = self.folder(name) / LOSS_PLOT_FILE
        return plot if plot.is_file() else None

    def card(self, name: str) -> dict[str, Any]:
        """What the page shows of a model: what it learned from, its size, its validation NLL."""
        try:
            loaded = self.load(name)
        except MidigenError as exc:
            return {"name": name, "error": str(exc)}
        config, provenance = loaded.model_config, loaded.provenance
        store = provenance.get("store") if isinstance(provenance.get("store"), dict) else {}
        folder = loaded.path
        return {
            "name": name,
            "kind": "run" if (folder / CHECKPOINT_FILE).is_file() else "model",
            "parameters": loaded.model.num_parameters(),
            "layers": config.n_layers,
            "heads": config.n_heads,
            "width": config.d_model,
            "context": config.context,
            "memory": config.memory,
            "steps_per_quarter": loaded.tokenizer.steps_per_quarter,
            "training_steps": loaded.step,
            "tokens_seen": provenance.get("tokens_seen"),
            "training_minutes": provenance.get("training_minutes"),
            "val_nll": provenance.get("val_nll"),
            "best_val_nll": provenance.get("best_val_nll"),
            "store": {key: store.get(key) for key in ("path", "songs", "training_songs", "tokens")},
            "loss_plot": f"/api/models/{name}/loss.png" if self.loss_plot(name) else None,
        }
