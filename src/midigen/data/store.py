"""The token store: a folder of flat arrays a trainer can memory-map, indexed by song.

Layout:
    tokenizer.json   the TokenizerConfig the songs were encoded with
    tokens.bin       uint16, all songs concatenated
    steps.bin        uint32, absolute step of each token
    bars.bin         uint32, bar index of each token
    beats.bin        uint16, position of each token inside its bar
    songs.jsonl      one row per song: path, hash, start, length, notes, split (the offsets index)
    skipped.jsonl    one row per file that could not be encoded: path, reason
    report.json      written last: files, encoded, tokens, skipped by reason; absent while unfinished

The arrays and the two journals are append-only; a song's row is written only after its tokens are
on disk, so after an interruption the rows name exactly the songs that are complete, and reopening
cuts off anything written past them. Ragged songs are handled by the offsets in `songs.jsonl`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from midigen.codec.config import TokenizerConfig
from midigen.codec.tokenizer import TokenSequence
from midigen.errors import MidigenError
from midigen.io_utils import atomic_write_text

ARRAY_DTYPES: dict[str, type[np.generic]] = {
    "tokens": np.uint16,
    "steps": np.uint32,
    "bars": np.uint32,
    "beats": np.uint16,
}
CONFIG_FILE = "tokenizer.json"
SONGS_FILE = "songs.jsonl"
SKIPPED_FILE = "skipped.jsonl"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class SongEntry:
    path: str
    hash: str
    start: int
    length: int
    notes: int
    split: str


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    @property
    def category(self) -> str:
        """The reason without its details ("malformed MIDI: bad chunk" → "malformed MIDI")."""
        return self.reason.split(":", 1)[0]


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete rows of a journal and the byte length they span (a torn last line is ignored)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return rows, len(complete)


class TokenStore:
    """Read access to a token store; arrays are memory-mapped, so opening is cheap at any size."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / CONFIG_FILE).exists():
            raise MidigenError(f"{self.root}: not a token store (no {CONFIG_FILE}); create one with `midigen encode`")
        self.config = TokenizerConfig.load(self.root / CONFIG_FILE)
        rows, _ = _read_jsonl(self.root / SONGS_FILE)
        self.songs = [SongEntry(**row) for row in rows]
        self.num_tokens = self.songs[-1].start + self.songs[-1].length if self.songs else 0
        self.arrays = {name: self._map(name, dtype) for name, dtype in ARRAY_DTYPES.items()}
        report_path = self.root / REPORT_FILE
        self.report: dict[str, Any] | None = json.loads(report_path.read_text()) if report_path.exists() else None

    def _map(self, name: str, dtype: type[np.generic]) -> np.ndarray:
        path = self.root / f"{name}.bin"
        if self.num_tokens == 0:
            return np.zeros(0, dtype=dtype)
        needed = self.num_tokens * np.dtype(dtype).itemsize
        if not path.exists() or path.stat().st_size < needed:
            raise MidigenError(f"{path}: store is damaged ({name} shorter than its index says)")
        return np.memmap(path, dtype=dtype, mode="r", shape=(self.num_tokens,))

    @property
    def complete(self) -> bool:
        """False while an encode is running or was interrupted (rerun it to finish)."""
        return self.report is not None

    def __len__(self) -> int:
        return len(self.songs)

    def song(self, index: int) -> TokenSequence:
        entry = self.songs[index]
        window = slice(entry.start, entry.start + entry.length)
        return TokenSequence(*(self.arrays[name][window].astype(np.int64) for name in ARRAY_DTYPES))

    def split_indices(self, split: str) -> list[int]:
        return [i for i, song in enumerate(self.songs) if song.split == split]

    def skipped(self) -> list[SkippedFile]:
        rows, _ = _read_jsonl(self.root / SKIPPED_FILE)
        return [SkippedFile(**row) for row in rows]


class StoreWriter:
    """Appends songs to a store, creating it or resuming an interrupted one."""

    def __init__(self, root: str | Path, config: TokenizerConfig) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise MidigenError(f"{self.root}: exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / CONFIG_FILE
        if config_path.exists():
            existing = TokenizerConfig.load(config_path)
            if existing != config:
                raise MidigenError(
                    f"{self.root}: store was encoded with a different tokenizer config; use a new output folder"
                )
        elif any(self.root.iterdir()):
            raise MidigenError(f"{self.root}: folder is not empty and is not a token store")
        else:
            config.save(config_path)
        self.config = config
        self.songs = [SongEntry(**row) for row in self._repair_journal(SONGS_FILE)]
        self.skipped = [SkippedFile(**row) for row in self._repair_journal(SKIPPED_FILE)]
        self.num_tokens = self.songs[-1].start + self.songs[-1].length if self.songs else 0
        self.files: dict[str, IO[bytes]] = {}
        for name, dtype in ARRAY_DTYPES.items():
            handle = open(self.root / f"{name}.bin", "ab")
            handle.truncate(self.num_tokens * np.dtype(dtype).itemsize)  # drop tokens of an unfinished song
            self.files[name] = handle
        self.songs_file = open(self.root / SONGS_FILE, "a")
        self.skipped_file = open(self.root / SKIPPED_FILE, "a")
        self.hashes = {song.hash: song.path for song in self.songs}
        self.pending_rows: list[SongEntry] = []  # songs whose index rows wait for their tokens to be flushed

    def _repair_journal(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        rows, length = _read_jsonl(path)
        if path.exists() and path.stat().st_size != length:
            with open(path, "r+b") as handle:
                handle.truncate(length)
        return rows

    def done_paths(self) -> set[str]:
        return {song.path for song in self.songs} | {skip.path for skip in self.skipped}

    def start_update(self) -> None:
        """Mark the store unfinished while it is being extended."""
        (self.root / REPORT_FILE).unlink(missing_ok=True)

    def add_song(self, path: str, content_hash: str, notes: int, split: str, sequence: TokenSequence) -> SongEntry:
        for name, dtype in ARRAY_DTYPES.items():
            self.files[name].write(np.ascontiguousarray(getattr(sequence, name), dtype=dtype).tobytes())
        entry = SongEntry(path, content_hash, self.num_tokens, len(sequence), notes, split)
        self.songs.append(entry)
        self.hashes[content_hash] = path
        self.num_tokens += len(sequence)
        self.pending_rows.append(entry)
        return entry

    def add_skipped(self, path: str, reason: str) -> None:
        skip = SkippedFile(path, reason)
        self.skipped.append(skip)
        self.skipped_file.write(json.dumps(asdict(skip)) + "\n")

    def flush(self) -> None:
        """Make every song added so far durable in order: arrays first, then their index rows."""
        for handle in self.files.values():
            handle.flush()
        for entry in self.pending_rows:
            self.songs_file.write(json.dumps(asdict(entry)) + "\n")
        self.pending_rows = []
        self.songs_file.flush()
        self.skipped_file.flush()

    def finish(self, files_seen: int) -> dict[str, Any]:
        self.flush()
        report = build_report(files_seen, self.songs, self.skipped, self.num_tokens)
        atomic_write_text(self.root / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        return report

    def close(self) -> None:
        self.flush()
        for handle in [*self.files.values(), self.songs_file, self.skipped_file]:
            handle.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_report(files_seen: int, songs: list[SongEntry], skipped: list[SkippedFile], tokens: int) -> dict[str, Any]:
    by_reason: dict[str, list[dict[str, str]]] = {}
    for skip in skipped:
        by_reason.setdefault(skip.category, []).append({"path": skip.path, "reason": skip.reason})
    return {
        "files": files_seen,
        "encoded": len(songs),
        "tokens": tokens,
        "skipped": by_reason,
        "skipped_count": len(skipped),
        "splits": {split: sum(1 for s in songs if s.split == split) for split in ("train", "val", "test")},
    }

