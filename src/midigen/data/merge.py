"""`midigen merge`: join token stores (the shards of an encode spread over machines) into one.

Stores must share a tokenizer config. The shards of one encode (`encode --shard I/N`) are joined in
shard order, whatever order they are named in, so the result equals the store one encode of all the
files would have written: a song whose content an earlier store already holds is skipped as a
duplicate, as encode skips it. Songs are copied one at a time, so memory does not grow with the stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midigen.codec.sandbox import EncodedSong
from midigen.data.store import StoreWriter, TokenStore
from midigen.errors import MidigenError
from midigen.workers import ForkSafeProgress

FLUSH_SONGS = 1000


@dataclass
class MergeSummary:
    store: Path
    report: dict
    songs: int
    duplicates: list[tuple[str, str]]  # (path, the path whose content it repeats)


def ordered_stores(paths: list[str | Path]) -> list[TokenStore]:
    """The stores, complete and of one tokenizer config; shards of one encode in shard order."""
    stores = [TokenStore(path) for path in paths]
    for store in stores:
        if not store.complete:
            raise MidigenError(f"{store.root}: store is unfinished (its encode was interrupted); finish it first")
        if store.config != stores[0].config:
            raise MidigenError(f"{store.root}: encoded with another tokenizer config than {stores[0].root}")
    shards = [store.shard() for store in stores]
    if all(shards):
        counts = {shard[1] for shard in shards}  # type: ignore[index]
        indices = sorted(shard[0] for shard in shards)  # type: ignore[index]
        if len(counts) > 1 or len(set(indices)) != len(indices):
            raise MidigenError("the stores are shards of different encodes (or the same shard twice)")
        stores.sort(key=lambda store: store.shard()[0])  # type: ignore[index]
    return stores


def merge_stores(inputs: list[str | Path], output: str | Path, progress: bool = True) -> MergeSummary:
    if not inputs:
        raise MidigenError("give at least one store to merge")
    stores = ordered_stores(inputs)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise MidigenError(f"{output}: already exists and is not empty; merge into a new folder")
    duplicates: list[tuple[str, str]] = []
    total = sum(len(store) for store in stores)
    with StoreWriter(output, stores[0].config) as writer, \
            ForkSafeProgress(total=total, unit="song", desc="merge", disable=not progress) as bar:
        writer.start_update()
        for store in stores:
            for index, song in enumerate(store.songs):
                original = writer.original_of(song.hash)
                if original is not None:
                    writer.add_skipped(song.path, f"duplicate: same content as {original}")
                    duplicates.append((song.path, original))
                else:
                    window = slice(song.start, song.start + song.length)
                    packed = b"".join(array[window].tobytes() for array in store.arrays.values())
                    writer.add_song(song.path, song.split, EncodedSong(
                        song.hash, song.notes, 0, 0, song.tempos, song.time_signatures, song.instruments, song.length,
                        packed))
                if index % FLUSH_SONGS == 0:
                    writer.flush()
                bar.update(1)
            for skip in store.skipped():
                writer.add_skipped(skip.path, skip.reason)
        report = writer.finish()
    return MergeSummary(output, report, report["encoded"], duplicates)
