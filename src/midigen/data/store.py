"""The token store: a folder of flat arrays a trainer can memory-map, indexed by song.

Layout:
    tokenizer.json   the TokenizerConfig the songs were encoded with (its `kind` names the tokenizer)
    tokens.bin       uint16, all songs concatenated
    steps.bin        uint32, absolute step of each token
    <feature>.bin    one per feature of the tokenizer (`Tokenizer.array_dtypes`): bars.bin (uint32, bar index of
                     each token), beats.bin (uint16, position inside its bar), instruments.bin (uint8) with instruments
    songs.jsonl      one row per song: path, hash, start, length, notes, split (the offsets index), and its tempo
                     map, time signatures (in steps) and instrument keys (absent in stores of midigen 0.2)
    skipped.jsonl    one row per file that could not be encoded: path, reason
    report.json      written last: files, encoded, tokens, skipped by reason; absent while unfinished
    shard.json       only in a store of one shard of an encode (`--shard I/N`): {"index": I, "count": N}
    .lock            held by the one encode that may write the store

The arrays and the two journals are append-only, and a song's row is written only after its tokens
are on disk. So whenever the writing stops (Ctrl-C, a killed process), the rows name exactly the
songs that are complete; readers ignore anything past them, and the next writer cuts it off. Ragged
songs are handled by the offsets in `songs.jsonl`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from midigen.codec.config import TokenizerConfig
from midigen.codec.registry import load_tokenizer
from midigen.codec.sandbox import EncodedSong
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import TokenSequence
from midigen.data.splits import SPLITS
from midigen.errors import MidigenError
from midigen.io_utils import atomic_write_text

WRITE_BUFFER_BYTES = 2**16  # a song's arrays are a few KB each: few system calls, and few pages for a short run to fault in
CONFIG_FILE = "tokenizer.json"
SONGS_FILE = "songs.jsonl"
SKIPPED_FILE = "skipped.jsonl"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"
SHARD_FILE = "shard.json"


@dataclass(frozen=True)
class SongEntry:
    path: str
    hash: str
    start: int
    length: int
    notes: int
    split: str
    tempos: tuple[tuple[int, float], ...] = ()  # (step, quarter notes per minute)
    time_signatures: tuple[tuple[int, int, int], ...] = ()  # (step, numerator, denominator)
    instruments: tuple[int, ...] = ()  # programs, 128 for drums

    def __post_init__(self) -> None:
        for name in ("path", "hash", "split"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is not a string")
        for name in ("start", "length", "notes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} is not a count")
        # JSON gives lists: hold them as tuples, checked
        object.__setattr__(self, "tempos", tuple((int(step), float(qpm)) for step, qpm in self.tempos))
        object.__setattr__(self, "time_signatures", tuple((int(step), int(numerator), int(denominator))
                                                          for step, numerator, denominator in self.time_signatures))
        object.__setattr__(self, "instruments", tuple(int(key) for key in self.instruments))

    def row(self) -> dict[str, Any]:
        """The JSON row of the index."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(self).items()}


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not isinstance(self.reason, str):
            raise TypeError("path and reason must be strings")

    @property
    def category(self) -> str:
        """The reason without its details ("malformed MIDI: bad chunk" → "malformed MIDI")."""
        return self.reason.split(":", 1)[0]


def _journal_rows(path: Path, row_type: type) -> Iterator[tuple[Any, int, int]]:
    """Complete rows of a journal, read one at a time, each with the byte offsets where it starts and ends (a torn
    last line is ignored)."""
    if not path.exists():
        return
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                return
            try:
                fields = json.loads(line)
                if not isinstance(fields, dict):
                    raise TypeError("not a JSON object")
                row = row_type(**fields)
            except (ValueError, TypeError, RecursionError) as exc:
                raise MidigenError(f"{path}: store is damaged (line {number}: {exc})") from None
            yield row, offset, offset + len(line)
            offset += len(line)


def _read_journal(path: Path, row_type: type) -> tuple[list[Any], int]:
    """Complete rows of a journal and the byte length they span."""
    rows, length = [], 0
    for row, _, length in _journal_rows(path, row_type):
        rows.append(row)
    return rows, length


def _row_at(path: Path, offset: int) -> dict[str, Any]:
    """The JSON row of a journal that starts at byte `offset`."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return json.loads(handle.readline())


def key_of(text: str) -> int:
    """A path's or content hash's 64-bit key, as a writer keeps them in memory: two different ones share a key with
    a chance of about 1e-9 in a collection of 176k files."""
    return int.from_bytes(hashlib.blake2b(text.encode(errors="surrogateescape"), digest_size=8).digest(), "big")


class KeyIndex:
    """64-bit keys → int values, 16 bytes a key: sorted numpy arrays, and the latest additions in a dict merged
    into them in blocks (a dict of the hex content hashes cost about 170 bytes a song, most of an encode's memory
    on a Lakh-size collection)."""

    BLOCK = 4096

    def __init__(self, keys: Iterable[int] = (), values: Iterable[int] = ()) -> None:
        keys, values = np.fromiter(keys, dtype=np.uint64), np.fromiter(values, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], values[order]  # (N,) sorted, (N,)
        self.recent: dict[int, int] = {}

    def get(self, key: int) -> int | None:
        if key in self.recent:
            return self.recent[key]
        at = int(np.searchsorted(self.keys, np.uint64(key)))
        return int(self.values[at]) if at < len(self.keys) and int(self.keys[at]) == key else None

    def add(self, key: int, value: int) -> None:
        self.recent[key] = value
        if len(self.recent) >= self.BLOCK:
            keys = np.concatenate([self.keys, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))])
            values = np.concatenate([self.values, np.fromiter(self.recent.values(), dtype=np.int64,
                                                              count=len(self.recent))])
            order = np.argsort(keys, kind="stable")
            self.keys, self.values, self.recent = keys[order], values[order], {}

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)


def _song_rows(root: Path) -> Iterator[tuple[SongEntry, int, int]]:
    """The index rows of a store with their byte offsets, checked to tile the arrays from the start."""
    path, end = root / SONGS_FILE, 0
    for number, (song, start, stop) in enumerate(_journal_rows(path, SongEntry), 1):
        if song.start != end:
            raise MidigenError(f"{path}: store is damaged (line {number}: song starts at token {song.start}, "
                               f"the songs before it end at {end})")
        end += song.length
        yield song, start, stop


class SongIndex(Sequence[SongEntry]):
    """A store's songs: their offsets, lengths, note counts and splits as numpy columns (about 40 bytes a song),
    each song's whole entry read from songs.jsonl when asked for. A list of entries, with their paths, hashes and
    tempo maps, cost about a kilobyte a song: as much as the tokens of a short one, in every training process."""

    def __init__(self, root: Path) -> None:
        self.path = root / SONGS_FILE
        starts, lengths, notes, splits, offsets = (array("q") for _ in range(5))
        for song, offset, _ in _song_rows(root):
            starts.append(song.start)
            lengths.append(song.length)
            notes.append(song.notes)
            splits.append(SPLITS.index(song.split) if song.split in SPLITS else len(SPLITS))
            offsets.append(offset)
        self.starts, self.lengths, self.notes, self.splits, self.offsets = (
            np.array(column, dtype=np.int64) for column in (starts, lengths, notes, splits, offsets))  # (N,) each

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> SongEntry:  # type: ignore[override]
        # numpy indexing: a negative index counts from the end, a bad one raises
        return SongEntry(**_row_at(self.path, int(self.offsets[index])))

    def __iter__(self) -> Iterator[SongEntry]:
        for number, (song, _, _) in enumerate(_song_rows(self.path.parent)):
            if number == len(self):
                return
            yield song

    def split_indices(self, split: str) -> list[int]:
        return np.flatnonzero(self.splits == SPLITS.index(split)).tolist() if split in SPLITS else []


class TokenStore:
    """Read access to a token store; arrays are memory-mapped, so opening is cheap at any size."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / CONFIG_FILE).exists():
            raise MidigenError(f"{self.root}: not a token store (no {CONFIG_FILE}); create one with `midigen encode`")
        self.config = TokenizerConfig.load(self.root / CONFIG_FILE)
        self.tokenizer = load_tokenizer(self.config)
        self.songs = SongIndex(self.root)
        self.num_tokens = int(self.songs.starts[-1] + self.songs.lengths[-1]) if len(self.songs) else 0
        self.arrays = {name: self._map(name, dtype) for name, dtype in self.tokenizer.array_dtypes.items()}
        self.report: dict[str, Any] | None = _read_report(self.root / REPORT_FILE)

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
        """Song `index` as a token sequence, with its bar grid (in a store of midigen 0.2, which kept no time
        signatures, rebuilt from the positions when decoded)."""
        entry = self.songs[index]
        window = slice(entry.start, entry.start + entry.length)
        grid = None
        if entry.time_signatures:
            grid = BarGrid.of(entry.time_signatures, self.config.steps_per_quarter, self.config.beat_positions)
        return TokenSequence.unpacked({name: array[window] for name, array in self.arrays.items()}, grid)

    def split_indices(self, split: str) -> list[int]:
        return self.songs.split_indices(split)

    def identity(self) -> str:
        """A hash of what a model trained on this store learned from: the tokenizer config and each song's
        content and split, in order (the same files encoded anywhere give the same identity)."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for song in self.songs:
            digest.update(f"{song.hash} {song.split}\n".encode())
        return digest.hexdigest()

    def skipped(self) -> list[SkippedFile]:
        return _read_journal(self.root / SKIPPED_FILE, SkippedFile)[0]

    def shard(self) -> tuple[int, int] | None:
        """(I, N) for the store of shard I of N of an encode, else None."""
        return _read_shard(self.root)


def _read_report(path: Path) -> dict[str, Any] | None:
    """report.json, or None while the store is unfinished."""
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise MidigenError(f"{path}: store is damaged (report not readable JSON: {str(exc).splitlines()[0]})") from None
    if not isinstance(report, dict):
        raise MidigenError(f"{path}: store is damaged (report is not a JSON object)")
    return report


def open_finished_store(path: str | Path) -> TokenStore:
    """A store to train on or evaluate with: one whose encode has finished, holding songs."""
    store = TokenStore(path)
    if not store.complete:
        raise MidigenError(f"{store.root}: store is unfinished (an encode was interrupted); rerun `midigen encode`")
    if len(store) == 0:
        raise MidigenError(f"{store.root}: store holds no songs")
    return store


def _read_shard(root: Path) -> tuple[int, int] | None:
    path = root / SHARD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return int(data["index"]), int(data["count"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MidigenError(f"{path}: damaged shard description ({exc})") from None


def _shard_text(shard: tuple[int, int] | None) -> str:
    return "all files" if shard is None else f"shard {shard[0]}/{shard[1]}"


class StoreWriter:
    """Appends songs to a store, creating it or resuming an interrupted one.

    It keeps in memory only what resuming, duplicates and the report need: 64-bit keys of the paths done before it
    opened the store and of the songs' contents, where each song's row starts, counts and the skipped files; about
    24 bytes a song.
    """

    def __init__(self, root: str | Path, config: TokenizerConfig, shard: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise MidigenError(f"{self.root}: exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        is_store = (self.root / CONFIG_FILE).exists()
        if not is_store and any(p.name not in (LOCK_FILE, SHARD_FILE) for p in self.root.iterdir()):
            raise MidigenError(f"{self.root}: folder is not empty and is not a token store")
        self.lock = self._lock()
        if not is_store:
            if shard is not None:
                atomic_write_text(self.root / SHARD_FILE, json.dumps({"index": shard[0], "count": shard[1]}) + "\n")
            config.save(self.root / CONFIG_FILE)  # last: from now on the folder is a store
        elif TokenizerConfig.load(self.root / CONFIG_FILE) != config:
            self.lock.close()
            raise MidigenError(f"{self.root}: store was encoded with a different tokenizer config; use a new output folder")
        elif _read_shard(self.root) != shard:
            self.lock.close()
            raise MidigenError(f"{self.root}: store holds another share of the files than {_shard_text(shard)} "
                               f"({_shard_text(_read_shard(self.root))}); use a new output folder")
        self.config = config
        self.num_tokens = songs_length = 0
        self.split_counts: Counter[str] = Counter()
        contents, done = array("Q"), array("Q")
        self.row_offsets = array("Q")  # (songs,) where each song's row starts in songs.jsonl
        for song, start, songs_length in _song_rows(self.root):
            self.num_tokens = song.start + song.length
            self.split_counts[song.split] += 1
            contents.append(key_of(song.hash))
            done.append(key_of(song.path))
            self.row_offsets.append(start)
        skipped, skipped_length = _read_journal(self.root / SKIPPED_FILE, SkippedFile)
        done.extend(key_of(skip.path) for skip in skipped)
        self.done_keys = np.unique(np.frombuffer(done, dtype=np.uint64))  # (N,) sorted
        self.contents = KeyIndex(contents, range(len(contents)))  # content key → song index
        self.skipped: list[SkippedFile] = skipped
        self.rows_end = songs_length  # bytes of songs.jsonl, its pending rows included
        self.songs_file = self._open_cut(SONGS_FILE, songs_length)
        self.skipped_file = self._open_cut(SKIPPED_FILE, skipped_length)
        self.item_bytes = {name: np.dtype(dtype).itemsize for name, dtype in load_tokenizer(config).array_dtypes.items()}
        self.files = {
            name: self._open_cut(f"{name}.bin", self.num_tokens * item_bytes, WRITE_BUFFER_BYTES)
            for name, item_bytes in self.item_bytes.items()
        }
        self.pending_rows: list[bytes] = []  # index rows of songs whose tokens are not yet flushed

    def done_before(self, path: str) -> bool:
        """Whether `path` was encoded or skipped before this writer opened the store."""
        key = np.uint64(key_of(path))
        at = int(np.searchsorted(self.done_keys, key))
        return at < len(self.done_keys) and bool(self.done_keys[at] == key)

    def original_of(self, content_hash: str) -> str | None:
        """The path of the song of the store with this content, if there is one."""
        index = self.contents.get(key_of(content_hash))
        if index is None:
            return None
        pending = index - (len(self.row_offsets) - len(self.pending_rows))
        if pending >= 0:
            return json.loads(self.pending_rows[pending])["path"]
        return _row_at(self.root / SONGS_FILE, self.row_offsets[index])["path"]

    def _lock(self) -> IO[bytes]:
        handle = open(self.root / LOCK_FILE, "ab")
        try:
            # a POSIX record lock, unlike flock, is not inherited by forked workers, so a worker that
            # outlives a killed encode cannot keep the store locked
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise MidigenError(f"{self.root}: another encode is writing this store") from None
            raise
        return handle

    def _open_cut(self, name: str, length: int, buffer_bytes: int = -1) -> IO[bytes]:
        """Open a file for appending after its first `length` bytes, cutting off anything past them."""
        handle = open(self.root / name, "ab", buffering=buffer_bytes)
        size = handle.seek(0, 2)
        if size < length:
            handle.close()
            raise MidigenError(f"{self.root / name}: store is damaged ({size} bytes, its index needs {length})")
        handle.truncate(length)
        return handle

    @property
    def encoded(self) -> int:
        return sum(self.split_counts.values())

    def start_update(self) -> None:
        """Mark the store unfinished while it is being extended."""
        (self.root / REPORT_FILE).unlink(missing_ok=True)

    def add_song(self, path: str, split: str, song: EncodedSong) -> SongEntry:
        packed, offset, length = memoryview(song.packed), 0, song.length
        for name, handle in self.files.items():  # the packed buffer holds the arrays one after the other
            size = length * self.item_bytes[name]
            handle.write(packed[offset : offset + size])
            offset += size
        entry = SongEntry(path, song.content_hash, self.num_tokens, song.length, song.notes, split, song.tempos,
                          song.time_signatures, song.instruments)
        row = (json.dumps(entry.row()) + "\n").encode()
        self.contents.add(key_of(song.content_hash), len(self.row_offsets))
        self.row_offsets.append(self.rows_end)
        self.rows_end += len(row)
        self.pending_rows.append(row)
        self.num_tokens += song.length
        self.split_counts[split] += 1
        return entry

    def add_skipped(self, path: str, reason: str) -> None:
        skip = SkippedFile(path, reason)
        self.skipped.append(skip)
        self.skipped_file.write((json.dumps(vars(skip)) + "\n").encode())

    def flush(self) -> None:
        """Make every song added so far durable in order: arrays first, then their index rows."""
        for handle in self.files.values():
            handle.flush()
        self.songs_file.write(b"".join(self.pending_rows))
        self.pending_rows = []
        self.songs_file.flush()
        self.skipped_file.flush()

    def finish(self) -> dict[str, Any]:
        self.flush()
        report = build_report(self.encoded, self.num_tokens, self.skipped, self.split_counts)
        atomic_write_text(self.root / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        return report

    def close(self) -> None:
        self.flush()
        for handle in [*self.files.values(), self.songs_file, self.skipped_file, self.lock]:
            handle.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_report(encoded: int, tokens: int, skipped: list[SkippedFile], split_counts: Counter[str]) -> dict[str, Any]:
    by_reason: dict[str, list[dict[str, str]]] = {}
    for skip in skipped:
        by_reason.setdefault(skip.category, []).append({"path": skip.path, "reason": skip.reason})
    return {
        "files": encoded + len(skipped),
        "encoded": encoded,
        "tokens": tokens,
        "skipped": by_reason,
        "skipped_count": len(skipped),
        "splits": {split: split_counts[split] for split in SPLITS},
    }
