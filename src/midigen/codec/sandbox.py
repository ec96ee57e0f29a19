"""Encoding untrusted MIDI files in worker processes that may crash or hang.

A malformed file can crash the MIDI parser itself (symusic is native code and has had segfaults on
malformed files) or make it spin, so files are encoded in worker processes under a watchdog: a
worker that dies or overruns its time is replaced, its file is reported with the reason, and the
other files go on.

Workers take files in chunks, so that messages cost little per file. A worker reads and parses the
files of its chunk one at a time, publishing in shared memory which file it is on and since when: a
crash or a hang is pinned on that one file, and the rest of the chunk is handed out again. The
parsed files are then tokenised together (`Tokenizer.encode_files`: one sort and a few array operations for all
of them, a large part of the cost of a small file), in
batches of bounded size. Results come back in input order, through a bounded reorder window, so
memory stays flat however many files there are.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from midigen.codec.config import TokenizerConfig
from midigen.codec.interface import Tokenizer
from midigen.codec.midi_io import NoteTable, read_midi_bytes, read_notes, tempo_map
from midigen.codec.registry import load_tokenizer
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import TokenSequence, unpack
from midigen.errors import BadMidiError, MidigenError
from midigen.workers import death_reason, process_context

DEFAULT_TIMEOUT_S = 120.0
MAX_CHUNK = 32
BATCH_NOTES = 2**18  # parsed notes a worker holds before tokenising them: bounds its memory
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class EncodedSong(NamedTuple):
    """One file encoded by a worker, in the compact form that crosses the process boundary cheaply."""

    content_hash: str  # blake2b-128 of the file's bytes
    notes: int  # notes read and kept (drums dropped are not counted), before merging
    merged: int  # notes dropped by the same-onset merge
    clamped: int  # notes shortened to max_duration
    tempos: tuple[tuple[int, float], ...]  # (step, quarter notes per minute)
    time_signatures: tuple[tuple[int, int, int], ...]  # (step, numerator, denominator)
    instruments: tuple[int, ...]  # instrument keys its notes play (programs, 128 for drums)
    length: int  # tokens
    packed: bytes  # `TokenSequence.pack(tokenizer.array_dtypes)`

    def sequence(self, tokenizer: Tokenizer) -> TokenSequence:
        """The token sequence, with the file's bar grid."""
        config = tokenizer.config
        grid = BarGrid.of(self.time_signatures, config.steps_per_quarter, config.beat_positions)
        return TokenSequence.unpacked(unpack(self.packed, tokenizer.array_dtypes), grid)


@dataclass(frozen=True)
class Skip:
    """A file that could not be encoded, and why (one line)."""

    reason: str


EncodeResult = EncodedSong | Skip


class ParsedFile(NamedTuple):
    content_hash: str  # blake2b-128 of the file's bytes
    notes: NoteTable


def parse_one(path: str) -> ParsedFile | Skip:
    """Read and parse one file: the part that may crash or hang on a malformed file. Never raises."""
    try:
        data = read_midi_bytes(path)
        notes = read_notes(data)
    except Exception as exc:  # every failure, expected or not, becomes the file's reason
        return skip_for(exc)
    return ParsedFile(hashlib.blake2b(data, digest_size=16).hexdigest(), notes)


def encode_together(paths: Sequence[str], tokenizer: Tokenizer,
                    on_file: Callable[[int], None] = lambda position: None) -> list[EncodeResult]:
    """Encode files in this process: each parsed on its own (`on_file(position)` before it, for a
    watchdog), then tokenised together in batches. Never raises: a failure is that file's `Skip`."""
    results: list[EncodeResult | None] = [None] * len(paths)
    batch: list[tuple[int, ParsedFile]] = []
    notes = 0
    for position, path in enumerate(paths):
        on_file(position)
        parsed = parse_one(path)
        if isinstance(parsed, Skip):
            results[position] = parsed
            continue
        batch.append((position, parsed))
        notes += len(parsed.notes)
        if notes >= BATCH_NOTES:  # right after the file that fills it, which the watchdog still blames
            _tokenise(batch, tokenizer, results)
            batch, notes = [], 0
    _tokenise(batch, tokenizer, results)
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


def _tokenise(batch: list[tuple[int, ParsedFile]], tokenizer: Tokenizer, results: list[EncodeResult | None]) -> None:
    """Tokenise parsed files together; if that fails, each alone, so that a failure is one file's."""
    if not batch:
        return
    try:
        encoded = tokenizer.encode_files([parsed.notes for _, parsed in batch])
    except Exception as exc:
        if len(batch) == 1:
            results[batch[0][0]] = skip_for(exc)
        else:
            for item in batch:
                _tokenise([item], tokenizer, results)
        return
    config = tokenizer.config
    for (position, parsed), done in zip(batch, encoded):
        sequence = done.sequence
        assert sequence.grid is not None
        results[position] = EncodedSong(
            content_hash=parsed.content_hash,
            notes=done.notes,
            merged=done.merged,
            clamped=done.clamped,
            tempos=tempo_map(parsed.notes, config.steps_per_quarter, config.tempo_qpm),
            time_signatures=tuple((c.step, c.numerator, c.denominator) for c in sequence.grid.changes),
            instruments=done.instruments,
            length=len(sequence),
            packed=sequence.pack(tokenizer.array_dtypes),
        )


def skip_for(exc: BaseException) -> Skip:
    """The one-line reason a file could not be encoded."""
    if isinstance(exc, BadMidiError):
        return Skip(exc.reason)
    if isinstance(exc, MidigenError):
        return Skip(str(exc))
    if isinstance(exc, MemoryError):
        return Skip("out of memory while encoding")
    return Skip(f"error: {type(exc).__name__}: {first_line(str(exc))}")  # a bug or an exotic file


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def encode_isolated(path: str | Path, config: TokenizerConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> EncodedSong:
    """Encode one file in a worker process; a crash, a hang or a bad file raises `BadMidiError`."""
    encoder = IsolatedEncoder(config, timeout_s)
    try:
        return encoder.encode(path)
    finally:
        encoder.close()


class IsolatedEncoder:
    """Encodes files one at a time in a worker process kept between them (a server's uploads: no process start
    per file). A crash, a hang or a bad file raises `BadMidiError`; a worker that crashed or overran is killed and
    the next file gets a fresh one. Safe to call from several threads (files are encoded one after another)."""

    def __init__(self, config: TokenizerConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.config, self.timeout_s = config, timeout_s
        self._context = process_context()
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def encode(self, path: str | Path) -> EncodedSong:
        finished: dict[int, EncodeResult] = {}
        with self._lock:
            worker = self._worker = _assigned(self._worker, [0], [str(path)], self._context, self.config)
            while not finished:
                ready = set(wait([worker.conn, worker.process.sentinel], timeout=POLL_S))
                if worker.collect(ready, finished):
                    break
                failure = worker.failure(ready, time.monotonic(), self.timeout_s)
                if failure is not None:
                    finished[0] = Skip(failure[1])
                    worker.stop(kill=True)
                    worker.reap()
                    self._worker = None
        result = finished[0]
        if isinstance(result, Skip):
            raise BadMidiError(path, result.reason)
        return result

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker.reap()
                self._worker = None


def encode_in_workers(
    paths: Iterable[str], total: int, config: TokenizerConfig, workers: int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[tuple[int, str, EncodeResult]]:
    """Encode the first `total` of `paths` in `workers` processes; yields (index, path, result) for each, in input
    order. `paths` is read as work is handed out: only the paths of files in flight are held (a window ahead of the
    oldest result not yet yielded), so a collection of any size costs the same memory."""
    context = process_context()
    upcoming = iter(paths)
    held: dict[int, str] = {}  # index → path of every file handed out and not yet yielded
    queue = _ChunkQueue(total, workers)
    window = 4 * MAX_CHUNK * workers  # how far results may run ahead of the oldest one not yet yielded
    finished: dict[int, EncodeResult] = {}
    next_out = 0
    # A slot gets a worker when there is a chunk for it (so the first one encodes while the next is
    # forked) and gives it up when no work is left (so workers exit while the last results come in).
    pool: list[_Worker | None] = [None] * min(workers, total)
    retired: list[_Worker] = []
    try:
        ready: set[Any] = set()
        while True:
            now = time.monotonic()
            for slot, worker in enumerate(pool):
                if worker is None or worker.chunk is None or worker.collect(ready, finished):
                    continue
                failure = worker.failure(ready, now, timeout_s)
                if failure is not None:
                    position, reason = failure
                    finished[worker.chunk[position]] = Skip(reason)
                    # the rest of the chunk goes out again (the results of the files before died with the worker)
                    queue.give_back(worker.chunk[:position] + worker.chunk[position + 1 :])
                    worker.stop(kill=True)
                    worker.reap()
                    pool[slot] = None
            # hand out work before passing results on, so that no worker waits while they are written
            for slot, worker in enumerate(pool):
                if worker is not None and worker.chunk is not None:
                    continue
                if chunk := queue.take(below=next_out + window):
                    for index in chunk:  # a new chunk continues where the last one ended; one given back is held
                        if index not in held:
                            path = next(upcoming, None)
                            if path is None:
                                raise MidigenError(f"the input files changed while encoding ({index} of {total} "
                                                   "found); run the command again to go on")
                            held[index] = path
                    pool[slot] = _assigned(worker, chunk, held, context, config)
                elif worker is not None and queue.empty:
                    worker.stop()
                    retired.append(worker)
                    pool[slot] = None
            while next_out in finished:
                yield next_out, held.pop(next_out), finished.pop(next_out)
                next_out += 1
            if next_out == total:
                return
            busy = [w for w in pool if w is not None and w.chunk is not None]
            if not busy:  # the window held back work that the results just passed on let through
                assert not queue.empty, "every unfinished file is queued or in a worker's chunk"
                continue
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S))
    finally:
        for worker in pool:
            if worker is not None:
                worker.stop(kill=worker.chunk is not None)
                retired.append(worker)
        for worker in retired:  # all told to stop first, so that they exit together
            worker.reap()


def _assigned(worker: _Worker | None, chunk: list[int], paths: Mapping[int, str] | Sequence[str], context: Any,
              config: TokenizerConfig) -> _Worker:
    """A worker encoding `chunk`: `worker` if it is alive, else a fresh one."""
    if worker is not None:
        if worker.assign(chunk, paths):
            return worker
        worker.stop(kill=True)  # it had died while idle
        worker.reap()
    worker = _Worker(context, config)
    if not worker.assign(chunk, paths):
        raise MidigenError("cannot start a worker process")
    return worker


class _ChunkQueue:
    """Indices still to encode, in order, handed out in chunks; chunks given back go out first."""

    def __init__(self, total: int, workers: int) -> None:
        self.total, self.workers, self.next = total, workers, 0
        self.returned: deque[list[int]] = deque()

    def take(self, below: int) -> list[int]:
        if self.returned:
            return self.returned.popleft()
        # smaller chunks towards the end keep every worker busy until the last file
        size = max(1, min(MAX_CHUNK, (self.total - self.next) // (2 * self.workers)))
        end = min(self.next + size, self.total, below)
        chunk = list(range(self.next, end))
        self.next = max(self.next, end)
        return chunk

    @property
    def empty(self) -> bool:
        """No file is left to hand out (a worker's crash may still give some back)."""
        return self.next == self.total and not self.returned

    def give_back(self, chunk: list[int]) -> None:
        if chunk:
            self.returned.append(chunk)


def _serve(conn: Connection, config: TokenizerConfig, progress: Any, parent: int) -> None:
    """A worker's loop: encode each chunk of paths it receives, publishing which file it is on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with(parent)
    gc.freeze()  # the garbage collector is not to walk (and so copy) every object inherited from the parent
    tokenizer = load_tokenizer(config)
    try:
        def on_file(position: int) -> None:
            progress[1] = time.monotonic()  # the start time first: the parent reads them the other way round
            progress[0] = position

        while (chunk := conn.recv()) is not None:
            conn.send(encode_together(chunk, tokenizer, on_file))
    except (EOFError, OSError):
        pass  # the parent is gone
    os._exit(0)  # nothing to clean up: skip the interpreter's shutdown, which the parent would wait for


def _die_with(parent: int) -> None:
    """Have Linux kill this worker when the encoding process dies (killed, it cannot stop its workers),
    even in the middle of a parse that would never end."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


class _Worker:
    def __init__(self, context: Any, config: TokenizerConfig) -> None:
        self.conn, child = context.Pipe()
        self.progress = context.RawArray("d", 2)  # (position in chunk, monotonic start time of that file)
        self.process = context.Process(target=_serve, args=(child, config, self.progress, os.getpid()), daemon=True)
        self.process.start()
        child.close()
        self.chunk: list[int] | None = None

    def assign(self, chunk: list[int], paths: Mapping[int, str] | Sequence[str]) -> bool:
        """Send a chunk of files; False if the worker is gone."""
        self.progress[0], self.progress[1] = 0, time.monotonic()
        try:
            self.conn.send([paths[i] for i in chunk])
        except OSError:
            return False
        self.chunk = chunk
        return True

    def collect(self, ready: set[Any], finished: dict[int, EncodeResult]) -> bool:
        """Take the chunk's results if they have arrived; False if not (yet, or ever)."""
        if self.conn not in ready:
            return False
        try:
            results = self.conn.recv()
        except (EOFError, OSError):
            return False  # died while replying
        assert self.chunk is not None
        finished.update(zip(self.chunk, results))
        self.chunk = None
        return True

    def failure(self, ready: set[Any], now: float, timeout_s: float) -> tuple[int, str] | None:
        """(position in the chunk, reason) of the file in hand if the worker died on it or overran its
        time with it, else None."""
        position = int(self.progress[0])  # before the start time, which the worker writes first
        if self.conn in ready or self.process.sentinel in ready:
            self.process.join(timeout=1)
            return position, f"parser crashed: {death_reason(self.process.exitcode)}"
        if now - self.progress[1] > timeout_s:
            return position, f"timed out: no result after {timeout_s:g} s"
        return None

    def stop(self, kill: bool = False) -> None:
        """Tell the worker to exit, or kill it; `reap` waits for it."""
        if kill:
            self.process.kill()
            return
        try:
            self.conn.send(None)
        except OSError:
            pass

    def reap(self) -> None:
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
