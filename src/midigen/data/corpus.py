"""`midigen corpus`: music bundled with music21, exported as MIDI files with a train/val/test split.

music21 ships scores (MusicXML, Humdrum, ABC), not MIDI, so each piece is parsed with music21 and
written as MIDI: one track per part, with the score's tempo, time and key signatures. A pickup bar
is padded with silence to a full bar so that bar lines fall where the codec's bar grid puts them.

Pieces are exported in worker processes under a watchdog (a piece that hangs or kills its worker is
reported, not fatal). Each MIDI file is written atomically, so a rerun skips what is already there
and finishes an interrupted export. The folder also gets `splits.json` (by `split_of`, the split the
token store computes) and `manifest.json` (sources, failures and their reasons).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import symusic

from midigen.codec.midi_io import parse_midi, write_midi
from midigen.codec.sandbox import first_line
from midigen.data.splits import SPLITS, split_of
from midigen.errors import MidigenError
from midigen.io_utils import atomic_write_text
from midigen.workers import ForkSafeProgress, death_reason, process_context

CORPORA = ("bach-chorales", "palestrina", "beethoven-quartets", "folk")
DEFAULT_TIMEOUT_S = 300.0  # a Beethoven movement takes ~10 s; a piece still going after this is stuck
POLL_S = 0.2
# Some works are stored in several formats; the MusicXML copies are the better-edited ones.
FORMAT_PREFERENCE = (".mxl", ".musicxml", ".xml", ".krn", ".abc")
# Josquin's ABC files hold one voice per X: number, the parts of polyphonic pieces, not tunes.
NOT_FOLK = ("josquin",)
# music21 names objects by memory address in its messages; the manifest must not change run to run
MEMORY_ADDRESS = re.compile(r"(0x|id\(\)=)[0-9a-fA-F]+")
SPLITS_FILE = "splits.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Piece:
    """One piece of a corpus: its MIDI file is `<name>.mid`."""

    name: str  # its source path inside music21's corpus, '/' → '_', without suffix (+ '_<tune>')
    source: str  # its score, relative to music21's corpus folder
    tune: int | None = None  # the X: reference number of a tune in an ABC collection

    @property
    def file_name(self) -> str:
        return f"{self.name}.mid"


@dataclass
class CorpusReport:
    corpus: str
    out_dir: Path
    exported: list[str] = field(default_factory=list)  # names exported by this run
    cached: list[str] = field(default_factory=list)  # names whose MIDI file was already there
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), failed in this run
    failed_before: list[tuple[str, str]] = field(default_factory=list)  # recorded by an earlier run, not retried
    paths: list[Path] = field(default_factory=list)  # MIDI files of the selected pieces now in out_dir

    @property
    def splits_path(self) -> Path:
        return self.out_dir / SPLITS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_FILE


def export_corpus(
    corpus: str,
    out_dir: str | Path,
    workers: int | None = None,
    limit: int | None = None,
    names: Sequence[str] | None = None,
    retry_failed: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> CorpusReport:
    """Export a bundled corpus (or its pieces `names`, or its first `limit` pieces) as MIDI into `out_dir`."""
    out = Path(out_dir)
    pieces = list_pieces(corpus)
    known_failures = _recorded_failures(out / MANIFEST_FILE, corpus)
    selected = select_pieces(pieces, corpus, names, limit)
    report = CorpusReport(corpus, out)
    todo = []
    for piece in selected:
        if (out / piece.file_name).exists():
            report.cached.append(piece.name)
        elif piece.name in known_failures and not retry_failed:
            report.failed_before.append((piece.name, known_failures[piece.name]))
        else:
            todo.append(piece)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    done = len(selected) - len(todo)
    with ForkSafeProgress(total=len(selected), initial=done, unit="piece", desc=corpus, disable=not progress) as bar:
        try:
            for piece, reason in _export_in_workers(todo, out, workers, timeout_s):
                if reason is None:
                    report.exported.append(piece.name)
                else:
                    report.failed.append((piece.name, reason))
                bar.update(1)
        finally:
            _remove_temp_files(out)
    order = {piece.name: index for index, piece in enumerate(selected)}
    report.exported.sort(key=order.__getitem__)
    report.failed.sort(key=lambda failure: order[failure[0]])
    report.paths = [out / p.file_name for p in selected if (out / p.file_name).exists()]
    known_failures.update(report.failed)
    _write_index(out, corpus, pieces, known_failures)
    return report


def list_pieces(corpus: str) -> list[Piece]:
    """Every piece of a corpus, each once, in a fixed order."""
    listers: dict[str, Callable[[Path], list[Piece]]] = {
        "bach-chorales": _bach_chorales,
        "palestrina": lambda root: _scores_of(root, "palestrina"),
        "beethoven-quartets": lambda root: _scores_of(root, "beethoven"),
        "folk": _folk_tunes,
    }
    if corpus not in listers:
        raise MidigenError(f"unknown corpus {corpus!r}; choose one of: {', '.join(CORPORA)}")
    return listers[corpus](corpus_root())


def select_pieces(pieces: list[Piece], corpus: str, names: Sequence[str] | None, limit: int | None) -> list[Piece]:
    """The pieces called `names` (all if None), in corpus order, the first `limit` of them."""
    if limit is not None and limit < 1:
        raise MidigenError(f"limit must be at least 1, not {limit}")
    if names is not None:
        known = {piece.name for piece in pieces}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise MidigenError(f"{corpus} has no piece named {', '.join(unknown)} (names look like {pieces[0].name})")
        wanted = set(names)
        pieces = [piece for piece in pieces if piece.name in wanted]
    return pieces[:limit]


def export_piece(piece: Piece, out_dir: Path) -> str | None:
    """Write `out_dir/<name>.mid` atomically; None on success, else why it failed (one line)."""
    try:
        write_midi(piece_midi(piece), out_dir / piece.file_name)
    except Exception as exc:  # music21 raises many kinds of exception on odd scores: report them all
        return f"{type(exc).__name__}: {_one_line_reason(exc)}"
    return None


def _one_line_reason(exc: Exception) -> str:
    return MEMORY_ADDRESS.sub(r"\1…", first_line(str(exc)))


def piece_midi(piece: Piece) -> symusic.Score:
    """The piece parsed by music21, as a MIDI score in ticks."""
    from music21 import converter, midi

    # forceSource: no pickled copies in music21's scratch folder, which would outlive the export
    score = converter.parse(corpus_root() / piece.source, number=piece.tune, forceSource=True)
    _unshare_signatures(score)
    midi_score = parse_midi(midi.translate.streamToMidiFile(score).writestr(), piece.source)
    return _tidied(midi_score, _pickup_quarters(score))


def corpus_root() -> Path:
    """music21's corpus folder (music21 is imported only here and in workers: it takes ~0.5 s)."""
    from music21 import common

    return Path(common.getCorpusFilePath())


def _bach_chorales(root: Path) -> list[Piece]:
    from music21 import corpus

    # The Riemenschneider list names 21 chorales twice.
    works = dict.fromkeys(corpus.chorales.Iterator(returnType="filename"))
    return list(dict.fromkeys(_piece(root, _score_of_work(root, work)) for work in works))


def _score_of_work(root: Path, work: str) -> Path:
    for suffix in FORMAT_PREFERENCE:
        path = root / f"{work}{suffix}"
        if path.exists():
            return path
    from music21 import corpus

    # music21's own search, for works stored under a longer name ('bach/bwv18.5-l' is bwv18.5-lz.mxl)
    found = corpus.getWork(work)
    if isinstance(found, list):
        raise MidigenError(f"music21 corpus: {work} matches {len(found)} files")
    return Path(found)


def _scores_of(root: Path, composer: str) -> list[Piece]:
    from music21 import corpus

    return [_piece(root, path) for path in _one_format_each(Path(p) for p in corpus.getComposer(composer))]


def _one_format_each(paths: Iterable[Path]) -> list[Path]:
    """Of the files of one work (same path but for the suffix), the one first in FORMAT_PREFERENCE."""
    best: dict[Path, Path] = {}
    for path in paths:
        work = path.with_suffix("")
        if work not in best or _format_rank(path) < _format_rank(best[work]):
            best[work] = path
    return [best[work] for work in sorted(best)]


def _format_rank(path: Path) -> int:
    suffix = path.suffix.lower()
    return FORMAT_PREFERENCE.index(suffix) if suffix in FORMAT_PREFERENCE else len(FORMAT_PREFERENCE)


def _folk_tunes(root: Path) -> list[Piece]:
    from music21 import corpus

    files = sorted(Path(p) for p in corpus.getPaths(fileExtensions=("abc",)))
    tunes = []
    for path in files:
        if path.relative_to(root).parts[0] not in NOT_FOLK:
            tunes.extend(_piece(root, path, number) for number in _tune_numbers(path))
    return tunes


def _tune_numbers(path: Path) -> list[int]:
    """The X: reference numbers of an ABC file, read the way music21 finds the tune it is asked for."""
    numbers = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        field_text = line.replace(" ", "").strip()
        if field_text.startswith("X:") and field_text[2:].isdigit():
            numbers.append(int(field_text[2:]))
    return list(dict.fromkeys(numbers))  # music21 can only reach the first of a repeated number


def _piece(root: Path, path: Path, tune: int | None = None) -> Piece:
    source = path.relative_to(root).as_posix()
    name = source.rsplit(".", 1)[0].replace("/", "_")
    return Piece(name if tune is None else f"{name}_{tune}", source, tune)


def _unshare_signatures(score: Any) -> None:
    """Give each bar its own signature objects.

    music21's ABC reader puts one TimeSignature object in two bars when a tune returns to its metre
    after an irregular bar (about 1 Essen tune in 10); its MIDI writer then fails with "already found
    in this Stream".
    """
    from music21 import key, meter, tempo

    signature_classes = (meter.TimeSignature, key.KeySignature, tempo.MetronomeMark)
    seen: set[int] = set()
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        for element in list(container.getElementsByClass(signature_classes)):
            if id(element) in seen:
                container.replace(element, copy.deepcopy(element))
            seen.add(id(element))


def _pickup_quarters(score: Any) -> float:
    """How much shorter than a full bar the first bar is (music21's padding), in quarter notes."""
    from music21 import stream

    first_bar = score.recurse().getElementsByClass(stream.Measure).first()
    return float(first_bar.paddingLeft) if first_bar is not None else 0.0


def _tidied(score: symusic.Score, pickup_quarters: float) -> symusic.Score:
    """Tracks with notes only, the pickup padded to a full bar, and only the events that change something."""
    score.tracks = [track for track in score.tracks if track.note_num() > 0]  # music21 lyrics get a track of their own
    if not score.tracks:
        raise MidigenError("no notes")
    shift = round(pickup_quarters * score.ticks_per_quarter)
    if shift:
        for track in score.tracks:
            track.shift_time(shift, inplace=True)
        for events in (score.tempos, score.time_signatures, score.key_signatures, score.markers):
            for event in events:
                if event.time > 0:  # the opening tempo and signatures stay at the start of the padded bar
                    event.time += shift
    # music21 repeats the signatures in every part and after each repeat; a restated time signature
    # mid-bar (after an incomplete bar) would restart the codec's bar grid there.
    score.time_signatures = _changes_only(score.time_signatures, lambda e: (e.numerator, e.denominator))
    score.key_signatures = _changes_only(score.key_signatures, lambda e: (e.key, e.tonality))
    score.tempos = _changes_only(score.tempos, lambda e: e.mspq)
    return score


def _changes_only(events: Any, value: Callable[[Any], object]) -> list[Any]:
    kept: list[Any] = []
    for event in sorted(events, key=lambda e: e.time):
        if not kept or value(event) != value(kept[-1]):
            kept.append(event)
    return kept


def _recorded_failures(manifest_path: Path, corpus: str) -> dict[str, str]:
    """name → reason of the pieces an earlier export of this folder could not export."""
    if not manifest_path.exists():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MidigenError(f"{manifest_path}: cannot read the corpus manifest: {exc}") from exc
    if manifest.get("corpus") != corpus:
        held = manifest.get("corpus")
        raise MidigenError(f"{manifest_path.parent} holds the {held} corpus, not {corpus}: export into another folder")
    return {entry["name"]: entry["reason"] for entry in manifest.get("failed", [])}


def _write_index(out: Path, corpus: str, pieces: list[Piece], failures: dict[str, str]) -> None:
    """splits.json and manifest.json, over every piece of the corpus in the folder (not only this run's)."""
    from music21 import __version__ as music21_version

    present = [piece for piece in pieces if (out / piece.file_name).exists()]
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for piece in present:
        splits[split_of(piece.file_name)].append(piece.file_name)
    failed = [piece for piece in pieces if piece.name in failures and piece not in present]
    manifest = {
        "corpus": corpus,
        "music21_version": music21_version,
        "pieces": [_manifest_entry(piece, file=piece.file_name, split=split_of(piece.file_name)) for piece in present],
        "failed": [_manifest_entry(piece, reason=failures[piece.name]) for piece in failed],
    }
    atomic_write_text(out / SPLITS_FILE, json.dumps(splits, indent=1) + "\n")
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def _manifest_entry(piece: Piece, **extra: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": piece.name, "source": piece.source}
    if piece.tune is not None:
        entry["tune"] = piece.tune
    return {**entry, **extra}


def _remove_temp_files(out: Path) -> None:
    """Temporary files of pieces whose worker was killed (a timeout, a crash or Ctrl-C)."""
    for temp in out.glob(".*.mid.*.tmp"):
        temp.unlink(missing_ok=True)


def _export_in_workers(
    pieces: Sequence[Piece], out: Path, workers: int, timeout_s: float
) -> Iterator[tuple[Piece, str | None]]:
    """Export pieces in worker processes; yields (piece, failure reason or None) as each one ends."""
    context = process_context()
    queue = deque(pieces)
    pool: list[_Worker] = []
    try:
        pool = [_Worker(context, out) for _ in range(min(workers, len(pieces)))]
        while queue or any(worker.piece is not None for worker in pool):
            for slot, worker in enumerate(pool):
                if worker.piece is None and queue:
                    pool[slot] = worker.assign(queue.popleft())
            busy = [worker for worker in pool if worker.piece is not None]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S))
            for slot, worker in enumerate(pool):
                outcome = None if worker.piece is None else worker.outcome(ready, timeout_s)
                if outcome is None:
                    continue
                piece, worker.piece = worker.piece, None
                if outcome.worker_lost:
                    pool[slot] = worker.replaced()
                yield piece, outcome.reason
    finally:
        for worker in pool:
            worker.stop()


@dataclass(frozen=True)
class _Outcome:
    reason: str | None  # why the piece failed, None if it was exported
    worker_lost: bool  # the worker died or overran its time and must be replaced


class _Worker:
    """A process that exports the pieces it is sent, one at a time."""

    def __init__(self, context: Any, out: Path) -> None:
        self.context, self.out = context, out
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, out), daemon=True)
        self.process.start()
        child.close()
        self.piece: Piece | None = None
        self.started = 0.0

    def assign(self, piece: Piece) -> _Worker:
        """Send `piece` to this worker, or to a fresh one if this one died while idle; returns which."""
        worker = self
        try:
            worker.conn.send(piece)
        except OSError:
            worker = self.replaced()
            worker.conn.send(piece)
        worker.piece, worker.started = piece, time.monotonic()
        return worker

    def outcome(self, ready: set[Any], timeout_s: float) -> _Outcome | None:
        """How the piece in hand ended, or None while it is still being exported."""
        if self.conn in ready:
            try:
                return _Outcome(self.conn.recv(), worker_lost=False)
            except (EOFError, OSError):
                pass  # it died while replying
        if self.conn in ready or self.process.sentinel in ready:
            self.process.join(timeout=1)
            return _Outcome(f"worker process died ({death_reason(self.process.exitcode)})", worker_lost=True)
        if time.monotonic() - self.started > timeout_s:
            return _Outcome(f"timed out after {timeout_s:g} s", worker_lost=True)
        return None

    def replaced(self) -> _Worker:
        self.stop()
        return _Worker(self.context, self.out)

    def stop(self) -> None:
        self.process.kill()  # idle, or abandoned mid-piece: its writes are atomic, so nothing is lost
        self.process.join()
        self.conn.close()


def _serve(conn: Connection, out: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    warnings.simplefilter("ignore")  # music21 warns about many corpus scores; failures are reported instead
    try:
        while True:
            conn.send(export_piece(conn.recv(), out))
    except (EOFError, OSError):
        pass  # the parent is gone
