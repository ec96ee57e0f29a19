"""`midigen encode`: MIDI files and folders → a token store, resumable, in parallel worker processes.

The files are encoded by `midigen.codec.sandbox` (workers that may crash or hang on a bad file) and
written in input order, so a store's content does not depend on the number of workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import MIDI_SUFFIXES
from midigen.codec.sandbox import DEFAULT_TIMEOUT_S, EncodedSong, EncodeResult, encode_in_workers
from midigen.data.splits import split_of
from midigen.data.store import StoreWriter
from midigen.errors import MidigenError
from midigen.workers import ForkSafeProgress

FLUSH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Shard:
    """The `index`-th (from 0) of `count` contiguous, equal shares of an encode's sorted input files, so that the
    shards' stores, merged in shard order, hold the songs in the order one encode would."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise MidigenError(f"shard {self.index}/{self.count}: need 0 <= I < N (e.g. 0/8 ... 7/8)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise MidigenError(f"--shard {text!r}: expected I/N, e.g. 3/8")
        return cls(int(index), int(count))

    def of(self, paths: list[str]) -> list[str]:
        return paths[self.index * len(paths) // self.count : (self.index + 1) * len(paths) // self.count]


@dataclass
class EncodeSummary:
    store: Path
    report: dict[str, Any]
    new_songs: int = 0
    already_done: int = 0
    skipped_now: list[tuple[str, str]] = field(default_factory=list)


def find_midi_files(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Files named directly (whatever their suffix), then .mid/.midi files under folders, sorted, recursively."""
    for item in inputs:
        path = os.fspath(item)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                yield from (os.path.join(root, name) for name in sorted(files) if name.lower().endswith(MIDI_SUFFIXES))
        else:
            yield path  # missing or unreadable paths are reported by the worker like any bad file


def input_paths(inputs: Iterable[str | Path]) -> list[str]:
    """Absolute paths of the MIDI files to encode, each once, so a rerun from any folder resumes."""
    return list(dict.fromkeys(os.path.abspath(p) for p in find_midi_files(inputs)))


def encode_files(
    inputs: Iterable[str | Path],
    store_dir: str | Path,
    config: TokenizerConfig | None = None,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
    shard: Shard | None = None,
) -> EncodeSummary:
    """Encode MIDI files (and folders, recursively) into a token store, resuming an interrupted one; with `shard`,
    only that share of the files (`midigen merge` joins the shards' stores)."""
    config = config or TokenizerConfig()
    workers = max(1, workers or os.cpu_count() or 1)
    with StoreWriter(store_dir, config, shard=None if shard is None else (shard.index, shard.count)) as writer:
        paths = input_paths(inputs)
        if shard is not None:
            paths = shard.of(paths)
        todo = [path for path in paths if path not in writer.done]
        summary = EncodeSummary(Path(store_dir), {}, already_done=len(paths) - len(todo))
        if todo:
            writer.start_update()
        with ForkSafeProgress(total=len(paths), initial=summary.already_done, unit="file", desc="encode", disable=not progress) as bar:
            last_flush = time.monotonic()
            for index, result in encode_in_workers(todo, config, workers, timeout_s):
                _record(writer, todo[index], result, summary)
                bar.update(1)
                if time.monotonic() - last_flush > FLUSH_INTERVAL_S:
                    writer.flush()
                    bar.set_postfix(encoded=writer.encoded, skipped=len(writer.skipped), refresh=False)
                    last_flush = time.monotonic()
        summary.report = writer.finish()
    return summary


def _record(writer: StoreWriter, path: str, result: EncodeResult, summary: EncodeSummary) -> None:
    if isinstance(result, EncodedSong):
        original = writer.hashes.get(result.content_hash)
        if original is None:
            writer.add_song(path, split_of(path), result)
            summary.new_songs += 1
            return
        reason = f"duplicate: same content as {original}"
    else:
        reason = result.reason
    writer.add_skipped(path, reason)
    summary.skipped_now.append((path, reason))
