"""`midigen encode`: MIDI files → token store, in parallel worker processes that may crash or hang.

A malformed file can crash the MIDI parser itself (a segfault in native code) or make it spin, so
each worker handles one file at a time under a watchdog: a worker that dies or overruns its time
is replaced, its file is recorded as skipped with the reason, and the run goes on. Results are
written in input order (a bounded reorder window), so a store's content does not depend on the
number of workers, and memory stays flat however many files there are.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import is_midi_path, read_midi_bytes, read_notes
from midigen.codec.tokenizer import SeedTokenizer
from midigen.data.splits import split_of
from midigen.data.store import StoreWriter
from midigen.errors import BadMidiError, MidigenError

DEFAULT_TIMEOUT_S = 120.0
FLUSH_INTERVAL_S = 1.0


@dataclass
class EncodeResult:
    store: Path
    report: dict[str, Any]
    new_songs: int = 0
    new_skipped: int = 0
    already_done: int = 0
    skipped_now: list[tuple[str, str]] = field(default_factory=list)


def find_midi_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly (whatever their suffix), then .mid/.midi files under folders, sorted, recursively."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    candidate = Path(root) / name
                    if is_midi_path(candidate):
                        yield candidate
        else:
            yield path  # missing or unreadable paths are reported by the worker like any bad file


def encode_one(path: str, tokenizer: SeedTokenizer) -> tuple[str, Any]:
    """Encode one file; returns ("ok", payload) or ("skip", reason). Never raises."""
    try:
        data = read_midi_bytes(path)
        notes = read_notes(data, tokenizer.config.keep_drums)
        sequence = tokenizer.encode(notes)
        content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
        return "ok", (content_hash, len(notes), sequence)
    except BadMidiError as exc:
        return "skip", exc.reason
    except MidigenError as exc:
        return "skip", str(exc)
    except MemoryError:
        return "skip", "out of memory while encoding"
    except Exception as exc:  # a bug or an exotic file: report it and keep the batch going
        return "skip", f"error: {type(exc).__name__}: {exc}"


def _worker_main(conn: Connection, config: TokenizerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tokenizer = SeedTokenizer(config)
    while True:
        task = conn.recv()
        if task is None:
            return
        index, path = task
        conn.send((index, *encode_one(path, tokenizer)))


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"parser crashed ({name})"
    return f"parser crashed (exit code {exitcode})"


class _Worker:
    def __init__(self, context: Any, config: TokenizerConfig) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, config), daemon=True)
        self.process.start()
        child.close()
        self.task: tuple[int, str] | None = None
        self.started = 0.0

    def assign(self, index: int, path: str) -> None:
        self.task = (index, path)
        self.started = time.monotonic()
        self.conn.send(self.task)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _context() -> Any:
    # fork starts workers in milliseconds; elsewhere spawn is the only safe choice
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def encode_files(
    inputs: Iterable[str | Path],
    store_dir: str | Path,
    config: TokenizerConfig | None = None,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> EncodeResult:
    """Encode MIDI files (and folders, recursively) into a token store, resuming an interrupted one."""
    from tqdm import tqdm

    config = config or TokenizerConfig()
    workers = max(1, workers or os.cpu_count() or 1)
    writer = StoreWriter(store_dir, config)
    result = EncodeResult(store=Path(store_dir), report={})
    try:
        done = writer.done_paths()
        paths = [str(p) for p in find_midi_files(inputs)]
        todo = [(i, p) for i, p in enumerate(paths) if p not in done]
        result.already_done = len(paths) - len(todo)
        if todo:
            writer.start_update()
        bar = tqdm(total=len(paths), initial=result.already_done, unit="file", desc="encode", disable=not progress)
        with bar:
            _run_pool(todo, writer, config, workers, timeout_s, result, bar)
        result.report = writer.finish(files_seen=len(set(paths) | done))
    finally:
        writer.close()
    return result


def _run_pool(
    todo: list[tuple[int, str]],
    writer: StoreWriter,
    config: TokenizerConfig,
    num_workers: int,
    timeout_s: float,
    result: EncodeResult,
    bar: Any,
) -> None:
    context = _context()
    window = max(64, 16 * num_workers)  # how far results may run ahead of the oldest unwritten file
    queue = iter(range(len(todo)))
    next_to_write = 0
    finished: dict[int, tuple[str, Any]] = {}
    pool = [_Worker(context, config) for _ in range(min(num_workers, len(todo)))]
    last_flush = time.monotonic()

    def record(position: int, outcome: tuple[str, Any]) -> None:
        finished[position] = outcome

    def write_ready() -> None:
        nonlocal next_to_write
        while next_to_write in finished:
            status, payload = finished.pop(next_to_write)
            path = todo[next_to_write][1]
            if status == "ok":
                content_hash, notes, sequence = payload
                if content_hash in writer.hashes:
                    status, payload = "skip", f"duplicate: same content as {writer.hashes[content_hash]}"
                else:
                    writer.add_song(path, content_hash, notes, split_of(path), sequence)
                    result.new_songs += 1
            if status == "skip":
                writer.add_skipped(path, payload)
                result.new_skipped += 1
                result.skipped_now.append((path, payload))
            next_to_write += 1
            bar.update(1)
        bar.set_postfix(encoded=len(writer.songs), skipped=len(writer.skipped), refresh=False)

    pending = next(queue, None)
    try:
        while pool:
            for worker in pool:
                if worker.task is None and pending is not None and pending < next_to_write + window:
                    worker.assign(pending, todo[pending][1])
                    pending = next(queue, None)
            busy = [w for w in pool if w.task is not None]
            if not busy:
                break
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5))
            now = time.monotonic()
            for slot, worker in enumerate(pool):
                if worker.task is None:
                    continue
                position = worker.task[0]
                if worker.conn in ready:
                    try:
                        index, status, payload = worker.conn.recv()
                        record(index, (status, payload))
                        worker.task = None
                        continue
                    except (EOFError, OSError):
                        pass  # the worker died mid-reply: treat as a crash below
                if worker.conn in ready or worker.process.sentinel in ready:
                    worker.process.join(timeout=1)
                    record(position, ("skip", _death_reason(worker.process.exitcode)))
                    worker.stop(kill=True)
                    pool[slot] = _Worker(context, config)
                elif now - worker.started > timeout_s:
                    record(position, ("skip", f"timed out after {timeout_s:g} s"))
                    worker.stop(kill=True)
                    pool[slot] = _Worker(context, config)
            write_ready()
            if now - last_flush > FLUSH_INTERVAL_S:
                writer.flush()
                last_flush = now
            if pending is None and all(w.task is None for w in pool):
                break
    finally:
        for worker in pool:
            worker.stop(kill=worker.task is not None)
        writer.flush()
