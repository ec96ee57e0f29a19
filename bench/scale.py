"""`midigen encode` at the scale of the Lakh MIDI Dataset (176,581 files): wall time, files/s, notes/s, peak memory.

The collection: 176,000 synthetic MIDI files (100 folders of 1,760, like Lakh's `lmd_full/0` ... `f`), written once
into .bench/lakh by both cores with symusic, from real music: the tracks of the multi-track files, prompts and
expressive piano pieces of ../shared/midi (where present; the test data's copies otherwise) and of three corpora
of music21 (Bach chorales, Beethoven quartets, Palestrina; exported once by `midigen corpus`). Each file is a song
of its own: pitched tracks drawn from the whole pool, each given a General MIDI program of a pop arrangement,
transposed (-5 ... +6 semitones), time-stretched (0.8 ... 1.25), repeated to fill the song, with new velocities;
drums in most files; its own tempo (every file a different one, so none is a duplicate that the store would skip),
time signature and resolution. The aim is Lakh's shape, as far as we know it: about 5-6k notes per file over
about 10 instruments, drums included (the figure of issue 28, not checked against the dataset here: the
dataset is not on this machine), with long files far longer than the median. So the notes per file are drawn
from a log-normal (median 4,200, σ 0.75: mean about 5,500) and the pitched tracks per file from 1 + Poisson(8);
the section states the figures of the files written.

Then `midigen encode` (the command, as a user runs it, in its own process, two workers) encodes the first 10% of
the folders and, into a new store, all of them. Peak memory is read from /proc every 50 ms: VmHWM (the kernel's
own high-water mark of resident memory, so nothing is missed between readings) of the encoding process, and the
largest VmHWM among its worker processes (forked: pages shared with the parent count in both).
Goals: 176,000 files in under 10 minutes on 2 cores; peak memory growth from 17,600 to 176,000 files under 1.2×.
`--quick`: 1,760 and 17,600 files (the time goal then judged on the larger run's rate, as a projection).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
from common import CACHE, SAMPLE_S, corpus_files, descendants, proc_status_kib, run_sampled, write_section

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "midi"
COLLECTION = CACHE / "lakh"
STORES = CACHE / "scale-stores"
FOLDER_FILES = 1_760
FOLDERS = 100  # 176,000 files
SIZES = {False: (10, 100), True: (1, 10)}  # folders encoded: full run, --quick
WORKERS = 2
TIME_GOAL_S = 600.0  # for 176,000 files
RSS_GROWTH_GOAL = 1.2

MEDIAN_NOTES, NOTES_SIGMA, MIN_NOTES, MAX_NOTES = 4_200, 0.75, 50, 60_000
MEAN_EXTRA_TRACKS = 8  # pitched tracks: 1 + Poisson(8)
DRUMS_SHARE = 0.85
TIME_SIGNATURES = ((4, 4), (3, 4), (6, 8), (2, 4))
TIME_SIGNATURE_SHARES = (0.88, 0.07, 0.03, 0.02)
RESOLUTIONS = (96, 120, 192, 220, 384, 480, 960)
# General MIDI programs of a pop arrangement, with rough weights: pianos, organ, guitars, basses, strings,
# ensembles, brass, reeds, pipes, synth leads and pads.
PROGRAMS = np.array([0, 1, 2, 4, 5, 11, 16, 18, 24, 25, 26, 27, 29, 30, 32, 33, 34, 35, 38, 40, 42, 48, 49, 50,
                     52, 56, 57, 61, 65, 66, 68, 71, 73, 80, 81, 88, 89, 90, 95])
PROGRAM_WEIGHTS = np.array([10, 2, 2, 2, 2, 1, 2, 1, 4, 5, 3, 3, 3, 3, 2, 6, 3, 2, 2, 1, 1, 6, 3, 2,
                            3, 2, 1, 2, 1, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1], dtype=np.float64)


# ---- the material: every track of the real files, in quarter notes ------------------------------
@dataclass
class Material:
    """One real track: onsets and durations in quarter notes, its pitches and its span (whole bars of 4/4)."""

    onsets: np.ndarray
    durations: np.ndarray
    pitches: np.ndarray
    span: float
    is_drum: bool

    @property
    def density(self) -> float:
        return len(self.onsets) / self.span


def source_files() -> list[Path]:
    folders = [SHARED / "multitrack", SHARED / "prompts", SHARED / "piano"]
    if not (SHARED / "multitrack").is_dir():
        folders = [PROJECT / "tests" / "data" / "multitrack", PROJECT / "tests" / "data" / "prompts"]
    files = [path for folder in folders for path in sorted(folder.glob("*.mid"))]
    return files + [path for corpus in ("bach-chorales", "beethoven-quartets", "palestrina")
                    for path in corpus_files(corpus)]


def load_material(paths: list[Path]) -> tuple[list[Material], list[Material]]:
    """The pitched and the drum tracks of the files (tracks of fewer than 8 notes left out)."""
    pitched, drums = [], []
    for path in paths:
        score = symusic.Score(str(path))
        for track in score.tracks:
            if track.note_num() < 8:
                continue
            notes = track.notes.numpy()
            onsets = notes["time"] / score.ticks_per_quarter
            onsets -= onsets.min()
            durations = np.maximum(notes["duration"] / score.ticks_per_quarter, 1 / 16)
            span = max(4.0, np.ceil((onsets + durations).max() / 4) * 4)
            (drums if track.is_drum else pitched).append(
                Material(onsets, durations, notes["pitch"].astype(np.int64), span, track.is_drum))
    return pitched, drums


# ---- one synthetic song -------------------------------------------------------------------------
def tiled(material: Material, quarters: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The track repeated back to back over `quarters` quarter notes: onsets, durations, pitches."""
    repeats = int(np.ceil(quarters / material.span))
    onsets = (np.arange(repeats)[:, None] * material.span + material.onsets[None, :]).ravel()
    keep = onsets < quarters
    return onsets[keep], np.tile(material.durations, repeats)[keep], np.tile(material.pitches, repeats)[keep]


def synthetic_song(number: int, pitched: list[Material], drums: list[Material]) -> tuple[symusic.Score, int, int]:
    """Song `number` of the collection (the same every time): the score, its notes and its instruments."""
    rng = np.random.default_rng(number)
    target_notes = np.clip(rng.lognormal(np.log(MEDIAN_NOTES), NOTES_SIGMA), MIN_NOTES, MAX_NOTES)
    parts = [pitched[i] for i in rng.integers(len(pitched), size=1 + rng.poisson(MEAN_EXTRA_TRACKS))]
    if rng.random() < DRUMS_SHARE:
        parts.append(drums[rng.integers(len(drums))])
    quarters = float(np.clip(target_notes / sum(part.density for part in parts), 8, 4_000))
    stretch = rng.uniform(0.8, 1.25)
    shift = int(rng.integers(-5, 7))
    tpq = int(rng.choice(RESOLUTIONS))
    score = symusic.Score(tpq)
    numerator, denominator = TIME_SIGNATURES[rng.choice(len(TIME_SIGNATURES), p=TIME_SIGNATURE_SHARES)]
    score.time_signatures.append(symusic.TimeSignature(0, numerator, denominator))
    # a tempo of its own, microseconds per quarter from 400,000 up by 2 per song: no two files alike
    score.tempos.append(symusic.Tempo(0, qpm=60e6 / (400_000 + 2 * number)))
    programs = rng.choice(PROGRAMS, size=len(parts), p=PROGRAM_WEIGHTS / PROGRAM_WEIGHTS.sum())
    notes = 0
    for part, program in zip(parts, programs):
        is_drum = part.is_drum
        onsets, durations, pitches = tiled(part, quarters)
        if not is_drum:
            pitches = pitches + shift
            inside = (pitches >= 0) & (pitches < 128)
            onsets, durations, pitches = onsets[inside], durations[inside], pitches[inside]
        ticks = tpq * stretch
        velocities = np.clip(rng.normal(rng.integers(50, 110), 12, len(onsets)), 1, 127)
        track = symusic.Track(name="drums" if is_drum else f"program {program}", program=0 if is_drum else int(program),
                              is_drum=is_drum)
        track.notes = symusic.Note.from_numpy(np.round(onsets * ticks).astype(np.int32),
                                              np.maximum(1, np.round(durations * ticks)).astype(np.int32),
                                              pitches.astype(np.int8), velocities.astype(np.int8))
        score.tracks.append(track)
        notes += len(onsets)
    return score, notes, len(parts)


# ---- the collection, written once by both cores -------------------------------------------------
_material: tuple[list[Material], list[Material]] = ([], [])  # loaded before the pool forks


def folder_of(index: int) -> Path:
    return COLLECTION / f"{index:03d}"


def write_folder(index: int) -> None:
    folder = folder_of(index)
    done = folder / ".stats.json"
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    notes, instruments = [], []
    for number in range(index * FOLDER_FILES, (index + 1) * FOLDER_FILES):
        score, song_notes, song_instruments = synthetic_song(number, *_material)
        score.dump_midi(str(folder / f"{number:06d}.mid"))
        notes.append(song_notes)
        instruments.append(song_instruments)
    done.write_text(json.dumps({"notes": notes, "instruments": instruments}))


def write_collection(folders: int) -> float:
    """Write the first `folders` folders that are missing; the seconds it took."""
    global _material
    missing = [i for i in range(folders) if not (folder_of(i) / ".stats.json").exists()]
    if not missing:
        return 0.0
    print(f"writing {len(missing) * FOLDER_FILES:,} synthetic files to {COLLECTION} (once)...", file=sys.stderr)
    start = time.perf_counter()
    _material = load_material(source_files())
    with mp.get_context("fork").Pool(WORKERS) as pool:
        pool.map(write_folder, missing, chunksize=1)
    return time.perf_counter() - start


def collection_stats(folders: int) -> dict[str, float]:
    notes, instruments = [], []
    for index in range(folders):
        stats = json.loads((folder_of(index) / ".stats.json").read_text())
        notes += stats["notes"]
        instruments += stats["instruments"]
    megabytes = sum(entry.stat().st_size for i in range(folders) for entry in os.scandir(folder_of(i))) / 1e6
    counts = np.array(notes)
    return {"files": len(notes), "notes": int(counts.sum()), "mean_notes": counts.mean(),
            "median_notes": float(np.median(counts)), "p90_notes": float(np.percentile(counts, 90)),
            "max_notes": int(counts.max()), "mean_instruments": float(np.mean(instruments)), "megabytes": megabytes}


# ---- the measurement ----------------------------------------------------------------------------
def encode_measured(folders: int) -> dict[str, float]:
    """`midigen encode` of the first `folders` folders into a fresh store: seconds, peak RSS (MiB), store size."""
    store = STORES / f"{folders * FOLDER_FILES}"
    shutil.rmtree(store, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "midigen"), "encode", *map(str, map(folder_of, range(folders))),
               "-o", str(store), "--workers", str(WORKERS), "--quiet"]

    def measure(pid: int) -> dict[str, int]:
        workers = [proc_status_kib(child).get("VmHWM", 0) for child in descendants(pid)]
        return {"process": proc_status_kib(pid).get("VmHWM", 0), "worker": max(workers, default=0)}

    _, peaks, seconds = run_sampled(command, measure)
    report = json.loads((store / "report.json").read_text())
    files = folders * FOLDER_FILES
    assert report["encoded"] == files, f"{files - report['encoded']} files skipped: {report['skipped']}"
    with open(store / "songs.jsonl") as rows:
        notes = sum(json.loads(row)["notes"] for row in rows)
    size = sum(entry.stat().st_size for entry in os.scandir(store))
    shutil.rmtree(store)  # tens of GB at full size
    return {"files": files, "seconds": seconds, "notes": notes, "tokens": report["tokens"], "store_gb": size / 1e9,
            "process_mib": peaks.get("process", 0) / 1024, "worker_mib": peaks.get("worker", 0) / 1024}


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(stats: dict[str, float], runs: list[dict[str, float]], generation_s: float, quick: bool) -> str:
    small, large = runs
    lines = [
        f"A synthetic collection in Lakh's shape (see `bench/scale.py`): {stats['files']:,} MIDI files, "
        f"{stats['megabytes'] / 1e3:.1f} GB, {stats['mean_notes']:,.0f} notes per file on average (median "
        f"{stats['median_notes']:,.0f}, 90th percentile {stats['p90_notes']:,.0f}, longest {stats['max_notes']:,}), "
        f"{stats['mean_instruments']:.1f} instruments per file, drums included"
        + (f"; written by {WORKERS} processes in {generation_s:.0f} s" if generation_s else "") + ".",
        "",
        f"`midigen encode FOLDER... -o STORE --workers {WORKERS}` run as a command; peak memory is the kernel's "
        "high-water mark (VmHWM) of the encoding process and of its largest worker, read from /proc every "
        f"{SAMPLE_S * 1e3:.0f} ms.",
        "",
        "| files | wall time | files/s | notes/s | tokens | store | peak RSS, encoding process | peak RSS, largest worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(f"| {run['files']:,} | {run['seconds']:.0f} s | {run['files'] / run['seconds']:,.0f} | "
                     f"{run['notes'] / run['seconds'] / 1e6:.2f} M | {run['tokens'] / 1e6:,.0f} M | "
                     f"{run['store_gb']:.1f} GB | {run['process_mib']:.0f} MiB | {run['worker_mib']:.0f} MiB |")
    projected = 176_000 / (large["files"] / large["seconds"])
    time_line = (f"176,000 files in {large['seconds']:.0f} s" if large["files"] == 176_000 else
                 f"176,000 files projected at the rate of the {large['files']:,}-file run: {projected:.0f} s")
    lines += ["", f"{time_line} (goal < {TIME_GOAL_S:.0f} s: {verdict(projected < TIME_GOAL_S)}).  "]
    for who, label in (("process_mib", "encoding process"), ("worker_mib", "largest worker")):
        growth = large[who] / small[who]
        lines.append(f"Peak RSS growth from {small['files']:,} to {large['files']:,} files, {label}: {growth:.2f}× "
                     f"(goal < {RSS_GROWTH_GOAL:g}×: {verdict(growth < RSS_GROWTH_GOAL)}).  ")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1,760 and 17,600 files, written to .bench/BENCHMARKS.quick.md, not BENCHMARKS.md")
    args = parser.parse_args()
    sizes = SIZES[args.quick]
    generation_s = write_collection(sizes[-1])
    stats = collection_stats(sizes[-1])
    STORES.mkdir(parents=True, exist_ok=True)
    runs = [encode_measured(folders) for folders in sizes]
    write_section("Encoding at Lakh scale (`midigen encode`, 176k files)", report(stats, runs, generation_s, args.quick),
                  quick=args.quick)


if __name__ == "__main__":
    main()
