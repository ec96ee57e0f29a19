"""`midigen corpus`: music bundled with music21, exported as MIDI files with a train/val/test split.

music21 ships scores (MusicXML, Humdrum, ABC), not MIDI, so each piece is parsed with music21 and
written as MIDI: one track per part, named after the part and set to the General MIDI program of its
instrument (percussion on the drum channel), with the score's tempo, time and key signatures. A pickup
bar is padded with silence to a full bar so that bar lines fall where the codec's bar grid puts them.

`chamber` gathers the pieces of music21's corpus written for two or more different instruments (a
voice counts as one): string quartets of Haydn, Mozart, Beethoven and Robert Schumann, a Corelli trio
sonata, a piano trio, songs, and Bach chorale settings with their orchestral parts.

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
import unicodedata
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

CORPORA = ("bach-chorales", "palestrina", "beethoven-quartets", "chamber", "folk")
DEFAULT_TIMEOUT_S = 300.0  # a Beethoven movement takes ~10 s; a piece still going after this is stuck
POLL_S = 0.2
# Some works are stored in several formats; the MusicXML copies are the better-edited ones.
FORMAT_PREFERENCE = (".mxl", ".musicxml", ".xml", ".krn", ".abc")
# Josquin's ABC files hold one voice per X: number, the parts of polyphonic pieces, not tunes.
NOT_FOLK = ("josquin",)
# music21 names objects by memory address in its messages; the manifest must not change run to run
MEMORY_ADDRESS = re.compile(r"(0x|id\(\)=)[0-9a-fA-F]+")
# The works of `chamber`: folders or scores (without suffix) of music21's corpus whose parts are for
# two or more different instruments. Bach's settings here are not among the Riemenschneider chorales
# of `bach-chorales` (bwv190.7-inst is the orchestral score of its chorale bwv190.7).
CHAMBER_WORKS = (
    "bach/bwv1.6", "bach/bwv112.5-sc", "bach/bwv12.7", "bach/bwv120.8-a", "bach/bwv124.6", "bach/bwv128.5",
    "bach/bwv130.6", "bach/bwv137.5", "bach/bwv149.7", "bach/bwv171.6", "bach/bwv175.7", "bach/bwv185.6",
    "bach/bwv190.7-inst", "bach/bwv195.6", "bach/bwv248.17", "bach/bwv248.35-3c", "bach/bwv248.64-6",
    "bach/bwv248.9-s", "bach/bwv31.9", "bach/bwv52.6", "bach/bwv59.3", "bach/bwv79.3", "bach/bwv79.6",
    "bach/bwv95.7", "bach/bwv97.9",
    "beach/prayer_of_a_tired_child",  # four voices and piano
    "beethoven",  # string quartets
    "corelli/opus3no1",  # trio sonata: two violins, violone and organ
    "handel/rinaldo",  # aria: voice and piano
    "haydn",  # string quartets
    "liliuokalani/aloha_oe",  # voices and piano
    "mozart/k155", "mozart/k156", "mozart/k458", "mozart/k80",  # string quartets
    "schubert/Lindenbaum",  # song: voice and piano
    "schumann_clara/opus17",  # piano trio: violin, cello and piano
    "schumann_robert/opus41no1",  # string quartet
    "schumann_robert/dichterliebe_no2", "schumann_robert/opus48no2",  # songs: voice and piano
    "weber/concertino_clarinet",  # clarinet and piano
    "webern/webern_dormi_jesu_op_16_no_2",  # voice and clarinet
)
# General MIDI programs by the words that name an instrument in part names (English, Italian, German,
# French), matched whole, first word first; music21's own instrument objects are often wrong in the
# corpus (String Ensemble for each part of a quartet, Piano for violins, Cello for the first violin).
VOICE_PROGRAM = 52  # Choir Aahs
CONTINUO_PROGRAM = 42  # a continuo part is its bass line: cello
GM_PROGRAM_WORDS: tuple[tuple[str, int], ...] = (
    (r"violon(cell[oei]?|celle)|cell[oi]|vc|vcl|vlc", 42),
    (r"violone|contrabass[oi]?|kontrabass|contrebasse|bassi|cb|kb", 43),
    (r"violin[oei]?|violine[n]?|geige|violon|vl|vln|vn", 40),
    (r"viol[ae]|viole|bratsche|vla|va", 41),
    (r"piccolo|ottavino", 72),
    (r"fl(u|oe|o)t(e|o|i|en)?|flauto|traverso|fl", 73),
    (r"recorder|blockflote|flauti|flautodolce", 74),
    (r"oboe[ns]?|oboi|hautbois|ob", 68),
    (r"clarinet(te|to|ti)?|klarinette[n]?|cl|kl", 71),
    (r"bassoon|fagott[oie]?|basson|fg|bn", 70),
    (r"horn|horns|corn[oi]|cor|waldhorn|hn", 60),
    (r"trumpet|trumpets|tromb[ae]|trompete[n]?|trompette|clarino|cornet+[os]?|tr|tpt", 56),
    (r"trombone[s]?|posaune[n]?|tbn", 57),
    (r"tuba[s]?", 58),
    (r"timpani|timpano|pauke[n]?|timbales|timp", 47),
    (r"harp|harfe|arpa|harpe", 46),
    (r"harpsichord|cembalo|clavecin", 6),
    (r"organ|organo|orgel|orgue", 19),
    (r"piano|pianoforte|fortepiano|klavier|pf|pno", 0),
    (r"guitar|gitarre|chitarra|guitare|lute|liuto|laute|luth", 24),
    (
        r"voice|voices|vocal|vocalist|gesang|singstimme|stimme|choir|chorus|coro|chor|"
        r"soprano|sopran|mezzo|alto|alt|contralto|tenor|tenore|baritone|bariton|bass|basso|bassus|"
        r"cantus|canto|altus|superius|discantus|contratenor|quintus|sextus",
        VOICE_PROGRAM,
    ),
)
DRUM_WORDS = re.compile(
    r"drum|drums|percussion|percussions|schlagzeug|snare|cymbal|cymbals|becken|hihat|cowbell|"
    r"triangle|triangel|tambourine|tamburin|castanets|woodblock|tamtam|gong"
)
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
        "chamber": _chamber_works,
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
    parts = _set_programs(score)
    midi_score = parse_midi(midi.translate.streamToMidiFile(score).writestr(), piece.source)
    return _labelled(_tidied(midi_score, _pickup_quarters(score)), parts)


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


def _chamber_works(root: Path) -> list[Piece]:
    from music21 import corpus

    def chosen(path: Path) -> bool:
        work = path.relative_to(root).with_suffix("").as_posix()
        return path.suffix.lower() in FORMAT_PREFERENCE and any(
            work == chamber_work or work.startswith(f"{chamber_work}/") for chamber_work in CHAMBER_WORKS
        )

    paths = [Path(p) for p in corpus.getPaths()]
    return [_piece(root, path) for path in _one_format_each(path for path in paths if chosen(path))]


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
    """Give each bar its own signature (and instrument) objects.

    music21's ABC reader puts one TimeSignature object in two bars when a tune returns to its metre
    after an irregular bar (about 1 Essen tune in 10); its MIDI writer then fails with "already found
    in this Stream".
    """
    from music21 import instrument, key, meter, tempo

    signature_classes = (meter.TimeSignature, key.KeySignature, tempo.MetronomeMark, instrument.Instrument)
    seen: set[int] = set()
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        for element in list(container.getElementsByClass(signature_classes)):
            if id(element) in seen:
                container.replace(element, copy.deepcopy(element))
            seen.add(id(element))


@dataclass(frozen=True)
class _PartInstrument:
    """What the MIDI track of a part must say: its name and its General MIDI instrument."""

    name: str
    program: int
    is_drum: bool
    has_notes: bool


def _set_programs(score: Any) -> list[_PartInstrument]:
    """Set every instrument of each part to the part's General MIDI program, for music21's MIDI writer.

    Returns each part's name, program and whether it is percussion, in the order of the score's parts
    (the order of music21's MIDI tracks), for `_labelled` to check the written MIDI against.
    """
    from music21 import instrument

    parts = []
    for part in score.parts:
        instruments = list(part.recurse().getElementsByClass(instrument.Instrument))
        program, is_drum = part_program(part)
        if not is_drum:
            if not instruments:
                part.insert(0, instrument.Instrument())
                instruments = list(part.recurse().getElementsByClass(instrument.Instrument))
            for found in instruments:
                found.midiProgram = program
        name = " ".join((part.partName or "").split())
        parts.append(_PartInstrument(name, program, is_drum, part.recurse().notes.first() is not None))
    return parts


def part_program(part: Any) -> tuple[int, bool]:
    """(General MIDI program, percussion?) of a music21 part.

    Percussion: an unpitched instrument, unpitched notes or a drum name (program 0 on the drum channel).
    Otherwise the first of: the part's name, its instrument's name (both by `GM_PROGRAM_WORDS`, then by
    music21's multilingual `instrument.fromString`), the program of its music21 instrument, 0 (piano).
    """
    from music21 import instrument, note, percussion

    found = part.getInstrument(returnDefault=False)
    names = [part.partName, part.partAbbreviation]
    if found is not None:
        names += [found.partName, found.instrumentName, found.instrumentAbbreviation]
    names = [name for name in names if name]
    unpitched = part.recurse().getElementsByClass((note.Unpitched, percussion.PercussionChord))
    if (
        isinstance(found, instrument.UnpitchedPercussion)
        or unpitched.first() is not None
        or any(DRUM_WORDS.fullmatch(word) for word in _words(names[0] if names else ""))
    ):
        return 0, True
    for name in names:
        program = program_of_name(name)
        if program is not None:
            return program, False
    for name in names:
        try:
            named = instrument.fromString(name)
        except Exception:  # music21 raises InstrumentException for names it does not know
            continue
        if named.midiProgram is not None:
            return _voice_as_choir(named, named.midiProgram), False
    if found is not None and found.midiProgram is not None:
        return _voice_as_choir(found, found.midiProgram), False
    return 0, False


def program_of_name(name: str) -> int | None:
    """The General MIDI program an instrument name stands for ('Violin I' 40, 'Violoncello.' 42), or None."""
    words = _words(name)
    if "continuo" in words:
        return CONTINUO_PROGRAM
    if any(pair in " ".join(words) for pair in ("english horn", "cor anglais", "corno inglese", "englischhorn")):
        return 69
    for word in words:
        for pattern, program in GM_PROGRAM_WORDS:
            if re.fullmatch(pattern, word):
                return program
    return None


def _words(name: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.findall(r"[a-z]+", plain)


def _voice_as_choir(found: Any, program: int) -> int:
    from music21 import instrument

    return VOICE_PROGRAM if isinstance(found, instrument.Vocalist) else program


def _labelled(score: symusic.Score, parts: list[_PartInstrument]) -> symusic.Score:
    """Each track named after its part, with the part's program and drum flag.

    music21 writes one track per part, in order; `_tidied` kept those with notes. Where the tracks
    and the parts with notes differ in number, the programs music21 wrote stay (set by `_set_programs`).
    """
    sounding = [part for part in parts if part.has_notes]
    if len(sounding) != len(score.tracks):
        return score
    for track, part in zip(score.tracks, sounding):
        track.name = part.name or track.name
        track.program = part.program
        track.is_drum = part.is_drum
    return score


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
