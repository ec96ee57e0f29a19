"""The takes the studio keeps: each generation's (or transcription's) MIDI file and what the page was told
of it, in one folder; its audio and piano roll are rendered when first asked for, and kept."""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import symusic

from midigen.codec.midi_io import write_midi
from midigen.errors import MidigenError
from midigen.evaluation.render import render_piano_roll, render_wav
from midigen.io_utils import atomic_write_text

TAKE_ID = re.compile(r"[0-9a-f]{32}")
FILES = ("mid", "wav", "png")


class UnknownTake(MidigenError):
    """No take of that id (HTTP 404)."""


def new_take_id() -> str:
    return uuid.uuid4().hex


class Takes:
    """Take files in `folder`: `<id>.mid`, `<id>.json`, and `<id>.wav` and `<id>.png` once rendered."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._render_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def save(self, take_id: str, score: symusic.Score, info: dict[str, Any]) -> None:
        """The take's MIDI file, then what was said of it (whose presence makes the take known)."""
        write_midi(score, self.folder / f"{take_id}.mid")
        atomic_write_text(self.folder / f"{take_id}.json", json.dumps(info) + "\n")

    def _checked(self, take_id: str) -> str:
        if not TAKE_ID.fullmatch(take_id) or not (self.folder / f"{take_id}.json").is_file():
            raise UnknownTake(f"no take {take_id[:40]!r}")
        return take_id

    def info(self, take_id: str) -> dict[str, Any]:
        return json.loads((self.folder / f"{self._checked(take_id)}.json").read_text())

    def midi(self, take_id: str) -> Path:
        return self.folder / f"{self._checked(take_id)}.mid"

    def file(self, take_id: str, kind: str) -> Path:
        """The take's `kind` file (mid, wav or png), rendered now if it has not been yet."""
        if kind not in FILES:
            raise UnknownTake(f"no {kind[:10]!r} file: a take has {', '.join(FILES)}")
        midi = self.midi(take_id)
        if kind == "mid":
            return midi
        path = midi.with_suffix(f".{kind}")
        with self._locks_lock:
            lock = self._render_locks.setdefault(path.name, threading.Lock())
        with lock:  # two pages asking at once render it once
            if not path.is_file():
                if kind == "wav":
                    render_wav(midi, path)
                else:
                    render_piano_roll(midi, path, title=self.info(take_id).get("title"))
        return path
