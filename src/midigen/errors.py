"""The one exception type users see: its message is a single line naming the file and the reason."""

from __future__ import annotations

from pathlib import Path


class MidigenError(Exception):
    """An expected failure (bad input, missing file, bad option). The CLI prints it as one line and exits 2."""


class BadMidiError(MidigenError):
    """A MIDI file that cannot be used, with the reason why."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)
