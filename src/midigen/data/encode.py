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

    def of(self, total: int) -> range:
        """The positions of this shard's files among `total`."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


@dataclass
class EncodeSummary:
    store: Path
    report: dict[str, Any]
    new_songs: int = 0
    already_done: int = 0
    skipped_now: list[tuple[str, str]] = field(default_factory=list)


def midi_files_under(folder: str, leave_out: frozenset[str] = frozenset(), watch: frozenset[str] = frozenset(),
                     reached: set[str] | None = None) -> Iterator[str]:
    """The .mid/.midi files under `folder`, sorted, recursively, without the files and folders in `leave_out`; the
    folders walked and files yielded that are in `watch` are added to `reached`."""
    for root, dirs, files in os.walk(folder):
        if root in watch and reached is not None:
            reached.add(root)
        dirs[:] = sorted(name for name in dirs if os.path.join(root, name) not in leave_out)
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.lower().endswith(MIDI_SUFFIXES) and path not in leave_out:
                if path in watch and reached is not None:
                    reached.add(path)
                yield path


def find_midi_files(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Files named directly (whatever their suffix), then .mid/.midi files under folders, sorted, recursively."""
    for item in inputs:
        path = os.fspath(item)
        if os.path.isdir(path):
            yield from midi_files_under(path)
        else:
            yield path  # missing or unreadable paths are reported by the worker like any bad file


def input_paths(inputs: Iterable[str | Path]) -> Iterator[str]:
    """The absolute paths of `find_midi_files`, each once, so a rerun from any folder resumes: an input named again
    or reached by the walk of a folder named before it is left out, and so is, from a folder's walk, what was named
    before it. Only the inputs are held, never the list of files."""
    named = [os.path.abspath(os.fspath(item)) for item in inputs]
    watch, reached, done = frozenset(named), set(), set()  # done: the inputs taken so far
    for path in named:
        if path in done or path in reached:
            continue
        before = frozenset(done)
        done.add(path)
        if os.path.isdir(path):
            yield from midi_files_under(path, before, watch, reached)
        else:
            yield path


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
    inputs = list(inputs)  # walked twice
    with StoreWriter(store_dir, config, shard=None if shard is None else (shard.index, shard.count)) as writer:
        # the files are walked twice (to count them, then to encode them) rather than held: 1 byte a file is kept
        done = bytearray(writer.done_before(path) for path in input_paths(inputs))
        share = range(len(done)) if shard is None else shard.of(len(done))
        already_done = sum(done[share.start : share.stop])
        todo = (path for index, path in enumerate(input_paths(inputs))
                if index in share and not done[index])
        total = len(share) - already_done
        summary = EncodeSummary(Path(store_dir), {}, already_done=already_done)
        if total:
            writer.start_update()
        with ForkSafeProgress(total=len(share), initial=already_done, unit="file", desc="encode",
                              disable=not progress) as bar:
            last_flush = time.monotonic()
            for _, path, result in encode_in_workers(todo, total, config, workers, timeout_s):
                _record(writer, path, result, summary)
                bar.update(1)
                if time.monotonic() - last_flush > FLUSH_INTERVAL_S:
                    writer.flush()
                    bar.set_postfix(encoded=writer.encoded, skipped=len(writer.skipped), refresh=False)
                    last_flush = time.monotonic()
        summary.report = writer.finish()
    return summary


def _record(writer: StoreWriter, path: str, result: EncodeResult, summary: EncodeSummary) -> None:
    if isinstance(result, EncodedSong):
        original = writer.original_of(result.content_hash)
        if original is None:
            writer.add_song(path, split_of(path), result)
            summary.new_songs += 1
            return
        reason = f"duplicate: same content as {original}"
    else:
        reason = result.reason
    writer.add_skipped(path, reason)
    summary.skipped_now.append((path, reason))
