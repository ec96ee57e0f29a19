"""`midigen encode` throughput against MidiTok's REMI and a music21 parse, and its peak memory.

The same MIDI files for all three (the Bach chorales of music21's corpus, exported once into .bench/
by `midigen corpus`, and a ten times larger set: the same chorales in ten transpositions), the same
number of worker processes, timed end to end with the pools' start-up:
- midigen: the whole `encode_files` into a fresh token store;
- MidiTok: `REMI.encode(path)` (one token stream for all tracks, as midigen writes) over a
  multiprocessing pool, the token ids sent back to the parent;
- music21: `converter.parse(path)` and a walk over its notes, over a pool, on the first few dozen
  chorales (it takes about a fifth of a second per file).
Each measurement runs in a fresh process that has imported only its own library (before the timing
starts, so that no worker spends its time importing), as a user's program would. The tools run in
interleaved rounds (music21 in the rounds on the chorales) and the median is reported, so background
load hits them alike. On the small set midigen's run lasts about a tenth of a second, much of it
starting and stopping workers; the large set shows the throughput on a real collection.
Peak memory: `encode_files` in a fresh process on N and on 10·N files, the encoding process and its
largest worker measured apart.
Instruments: on multi-track files (the band, orchestra and drum files and the prompts of the test data, the
expressive piano pieces of ../shared/midi/piano where present, and Beethoven's string quartets), each in ten
transpositions of its pitched tracks, midigen with instruments, drums and velocities (the default encoding) against
MidiTok's REMI with programs, and the tokens per note of each encoding.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import symusic
from common import CACHE, QUICK_BENCHMARKS, corpus_files, write_section

WORKERS = 2
ROUNDS = 5
LONG_ROUNDS = 3
MUSIC21_FILES = 40
TRANSPOSITIONS = range(-5, 5)
THROUGHPUT_GOALS = {"MidiTok REMI": 10.0, "music21": 300.0}
RSS_GROWTH_GOAL = 1.5

TRANSPOSED = CACHE / "transposed"
MULTITRACK = CACHE / "multitrack"
PROJECT = Path(__file__).resolve().parents[1]
SHARED_PIANO = PROJECT.parent / "shared" / "midi" / "piano"


# ---- the files ----------------------------------------------------------------------------------
def transposed_folders(chorales: Sequence[Path]) -> list[Path]:
    """One folder per transposition, each holding every chorale transposed: N files a folder."""
    folders = [TRANSPOSED / f"{shift:+d}" for shift in TRANSPOSITIONS]
    complete = TRANSPOSED / ".complete"
    if not complete.exists() or complete.read_text() != str(len(chorales)):
        print(f"writing {len(folders)} transpositions of each chorale to {TRANSPOSED} (once)...", file=sys.stderr)
        shutil.rmtree(TRANSPOSED, ignore_errors=True)
        for shift, folder in zip(TRANSPOSITIONS, folders):
            folder.mkdir(parents=True)
            for path in chorales:
                symusic.Score(str(path)).shift_pitch(shift).dump_midi(str(folder / path.name))
        complete.write_text(str(len(chorales)))
    return folders


def multitrack_files() -> tuple[list[Path], dict[str, list[Path]]]:
    """The multi-track set in ten transpositions of its pitched tracks (written once into .bench/), and the
    untransposed files by source."""
    sources = {
        "band, orchestra and drums (test data)": sorted((PROJECT / "tests" / "data" / "multitrack").glob("*.mid")),
        "pop and classical prompts (test data)": sorted((PROJECT / "tests" / "data" / "prompts").glob("*.mid")),
        "Beethoven string quartets (music21)": corpus_files("beethoven-quartets"),
    }
    if SHARED_PIANO.is_dir():
        sources["expressive piano (../shared/midi/piano)"] = sorted(SHARED_PIANO.glob("*.mid"))
    originals = [path for paths in sources.values() for path in paths]
    complete = MULTITRACK / ".complete"
    if not complete.exists() or complete.read_text() != f"{len(originals)} drums once":
        print(f"writing {len(TRANSPOSITIONS)} transpositions of {len(originals)} multi-track files to {MULTITRACK} "
              "(once)...", file=sys.stderr)
        shutil.rmtree(MULTITRACK, ignore_errors=True)
        for shift in TRANSPOSITIONS:
            folder = MULTITRACK / f"{shift:+d}"
            folder.mkdir(parents=True)
            for number, path in enumerate(originals):
                score = symusic.Score(str(path))
                if shift and all(track.is_drum for track in score.tracks if track.note_num()):
                    continue  # drums are not transposed: a drum file once
                for track in score.tracks:
                    if not track.is_drum:
                        track.shift_pitch(shift, inplace=True)
                score.dump_midi(str(folder / f"{number:03d}-{path.name}"))
        complete.write_text(f"{len(originals)} drums once")
    return sorted(MULTITRACK.rglob("*.mid")), sources


def tokens_per_note(sources: dict[str, list[Path]]) -> dict[str, dict[str, float]]:
    """Tokens per note read, by source and encoding (midigen's three, and MidiTok REMI with programs)."""
    from miditok import REMI, TokenizerConfig as MidiTokConfig

    from midigen.codec import TokenizerConfig, load_tokenizer, read_notes
    from midigen.errors import BadMidiError

    warnings.filterwarnings("ignore")
    encodings = {
        "single stream": TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0),
        "instruments and drums": TokenizerConfig(velocity_bins=0),
        "instruments, drums, 8 velocities (default)": TokenizerConfig(),
    }
    remi = REMI(MidiTokConfig(use_programs=True))
    table: dict[str, dict[str, float]] = {}
    for label, paths in sources.items():
        tables = [read_notes(path) for path in paths]
        row = {}
        for name, config in encodings.items():
            tokenizer, tokens, notes = load_tokenizer(config), 0, 0
            for notes_of_file in tables:
                try:
                    encoded = tokenizer.encode_files([notes_of_file])[0]
                except BadMidiError:  # a drum track alone, without drums
                    continue
                tokens, notes = tokens + len(encoded.sequence), notes + encoded.notes
            row[name] = tokens / notes
        row["MidiTok REMI, programs"] = sum(len(remi.encode(path).ids) for path in paths) / sum(map(len, tables))
        table[label] = row
    return table


def multitrack_report(rate: dict[str, float], files: int, megabytes: float, per_note: dict[str, dict[str, float]],
                      rounds: int) -> str:
    remi_goal = THROUGHPUT_GOALS["MidiTok REMI"]
    over = rate["midigen"] / rate["MidiTok REMI"]
    columns = list(next(iter(per_note.values())))
    lines = [
        f"{files} multi-track files ({megabytes:.1f} MB: each file below in ten transpositions of its pitched tracks, "
        "a drum track alone once), "
        f"{WORKERS} workers for both tools, median of {rounds} interleaved rounds. midigen encodes with instruments, "
        "drums and 8 velocity levels (the default); MidiTok's REMI with `use_programs=True` (one token stream).",
        "",
        "| files | midigen | MidiTok REMI (programs) | midigen / REMI |",
        "|---|---:|---:|---:|",
        f"| {files} multi-track | {rate['midigen']:,.0f} | {rate['MidiTok REMI']:,.0f} | {over:.1f}× "
        f"(goal ≥ {remi_goal:g}×: {verdict(over, remi_goal)}) |",
        "",
        "Tokens per note (of the notes each encoding keeps, before the merge of unisons: the single stream drops "
        "drums, so it leaves out the drum track alone):",
        "",
        "| files | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, row in per_note.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[column]:.2f}" for column in columns) + " |")
    return "\n".join(lines)


# ---- the three encoders: set up (imports included) untimed, then timed --------------------------
_remi: Any = None  # MidiTok's tokenizer, made before the pool forks so its workers inherit it


def _remi_ids(path: Path) -> np.ndarray:
    return np.asarray(_remi.encode(path).ids, dtype=np.int32)


def _music21_notes(path: Path) -> int:
    from music21 import converter

    score = converter.parse(str(path), forceSource=True)  # forceSource: parse the file, not a cached pickle
    return sum(len(note.pitches) for note in score.recurse().notes)


def midigen_encoder() -> Callable[[Sequence[Path]], None]:
    from midigen.data.encode import encode_files

    def run(paths: Sequence[Path]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            report = encode_files(paths, Path(folder) / "store", workers=WORKERS, progress=False).report
        assert report["encoded"] == len(paths), report["skipped"]

    return run


def miditok_encoder() -> Callable[[Sequence[Path]], None]:
    from miditok import REMI, TokenizerConfig

    global _remi
    warnings.filterwarnings("ignore")
    _remi = REMI(TokenizerConfig(use_programs=True))

    def run(paths: Sequence[Path]) -> None:
        with mp.get_context("fork").Pool(WORKERS) as pool:
            ids = pool.map(_remi_ids, paths, chunksize=8)
        assert all(len(song) for song in ids)

    return run


def music21_encoder() -> Callable[[Sequence[Path]], None]:
    importlib.import_module("music21")  # before the pool forks

    def run(paths: Sequence[Path]) -> None:
        with mp.get_context("fork").Pool(WORKERS) as pool:
            notes = pool.map(_music21_notes, paths)
        assert all(notes)

    return run


ENCODERS = {"midigen": midigen_encoder, "MidiTok REMI": miditok_encoder, "music21": music21_encoder}


def time_encoder(tool: str, list_file: Path) -> None:
    """In a fresh process: set the encoder up, time one run over the files listed, print the seconds."""
    run = ENCODERS[tool]()
    paths = [Path(line) for line in list_file.read_text().splitlines()]
    start = time.perf_counter()
    run(paths)
    print(time.perf_counter() - start)


def seconds_in_fresh_process(tool: str, paths: Sequence[Path]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as list_file:
        list_file.write("\n".join(map(str, paths)))
        list_file.flush()
        command = [sys.executable, __file__, "--time", tool, list_file.name]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.split()[-1])


def median_seconds(runs: dict[str, Sequence[Path]], rounds: int) -> dict[str, float]:
    """Median wall time of each tool on its files, the tools interleaved round by round."""
    times: dict[str, list[float]] = {tool: [] for tool in runs}
    for _ in range(rounds):
        for tool, paths in runs.items():
            times[tool].append(seconds_in_fresh_process(tool, paths))
    return {tool: statistics.median(values) for tool, values in times.items()}


def files_per_second(file_sets: dict[str, Sequence[Path]], rounds: int, long_rounds: int
                     ) -> tuple[dict[str, dict[str, float]], float]:
    """midigen's and MidiTok's files/s on each set of files; music21's on the first files of the first set, in the
    same rounds as the other two on that set."""
    for paths in file_sets.values():
        for path in paths:
            path.read_bytes()  # into the page cache, for every tool alike
    rates, music21_rate = {}, 0.0
    for i, (label, paths) in enumerate(file_sets.items()):
        runs = {"midigen": paths, "MidiTok REMI": paths}
        if i == 0:
            runs["music21"] = paths[:MUSIC21_FILES]
        seconds = median_seconds(runs, rounds if len(paths) < 1000 else long_rounds)
        if "music21" in seconds:
            music21_rate = len(runs["music21"]) / seconds.pop("music21")
        rates[label] = {tool: len(paths) / secs for tool, secs in seconds.items()}
    return rates, music21_rate


# ---- peak memory --------------------------------------------------------------------------------
def measure_peak_rss(folder: Path) -> None:
    """In a fresh process: encode `folder` and print the peak RSS (KiB) of this process and of its largest worker."""
    midigen_encoder()(sorted(folder.rglob("*.mid")))
    # VmHWM, not ru_maxrss, which keeps the peak of the process this one was started from
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # forked without exec: their own peak
    print(json.dumps({"process": peak, "worker": workers}))


def peak_rss_mib(folder: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--rss", str(folder)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {who: kib / 1024 for who, kib in json.loads(output.splitlines()[-1]).items()}


# ---- report -------------------------------------------------------------------------------------
def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    met = value >= goal if higher_is_better else value < goal
    return "met" if met else "NOT met"


def report(rates: dict[str, dict[str, float]], music21_rate: float, rss: dict[int, dict[str, float]], rounds: int,
           long_rounds: int) -> str:
    remi_goal, music21_goal = THROUGHPUT_GOALS["MidiTok REMI"], THROUGHPUT_GOALS["music21"]
    lines = [
        f"Files per second, end to end with {WORKERS} worker processes for every tool, pool start-up included: the "
        f"median of {rounds} interleaved rounds on the chorales, in each of which midigen and MidiTok encode all of "
        f"them and music21 parses the first {MUSIC21_FILES} ({music21_rate:.1f} files/s), and of {long_rounds} rounds "
        f"of midigen and MidiTok on the large set (compared with music21's rate on the chorales).",
        "",
        "| files | midigen | MidiTok REMI | midigen / REMI | midigen / music21 |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, rate in rates.items():
        over_remi, over_music21 = rate["midigen"] / rate["MidiTok REMI"], rate["midigen"] / music21_rate
        lines.append(
            f"| {label} | {rate['midigen']:,.0f} | {rate['MidiTok REMI']:,.0f} | {over_remi:.1f}× "
            f"(goal ≥ {remi_goal:g}×: {verdict(over_remi, remi_goal)}) | {over_music21:,.0f}× "
            f"(goal ≥ {music21_goal:g}×: {verdict(over_music21, music21_goal)}) |"
        )
    (n, small), (ten_n, large) = sorted(rss.items())
    lines += [
        "",
        f"Peak memory (RSS) of `encode_files` in a fresh process, {WORKERS} workers, on N and 10·N files:",
        "",
        "| files | encoding process | largest worker |",
        "|---:|---:|---:|",
        f"| N = {n} | {small['process']:.0f} MiB | {small['worker']:.0f} MiB |",
        f"| 10·N = {ten_n} | {large['process']:.0f} MiB | {large['worker']:.0f} MiB |",
        "",
    ]
    for who, label in (("process", "encoding process"), ("worker", "largest worker")):
        growth = large[who] / small[who]
        goal = f"goal < {RSS_GROWTH_GOAL:g}×: {verdict(growth, RSS_GROWTH_GOAL, higher_is_better=False)}"
        lines.append(f"Growth from N to 10·N, {label}: {growth:.2f}× ({goal}).  ")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (one round of each), writing to "
                             f".bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    parser.add_argument("--only", choices=("chorales", "multitrack"), help="run one of the two sections")
    args = parser.parse_args()
    rounds, long_rounds = (1, 1) if args.quick else (ROUNDS, LONG_ROUNDS)
    chorales = corpus_files("bach-chorales")
    if args.only != "multitrack":
        chorales_section(chorales, rounds, long_rounds, args.quick)
    if args.only != "chorales":
        multitrack_section(chorales, long_rounds, args.quick)


def chorales_section(chorales: list[Path], rounds: int, long_rounds: int, quick: bool) -> None:
    folders = transposed_folders(chorales)
    transposed = sorted(TRANSPOSED.rglob("*.mid"))
    sizes = {name: sum(p.stat().st_size for p in paths) / 1e6 for name, paths in (("N", chorales), ("10N", transposed))}
    file_sets = {
        f"N = {len(chorales)} Bach chorales ({sizes['N']:.1f} MB)": chorales,
        f"10·N = {len(transposed)}, each in ten transpositions ({sizes['10N']:.1f} MB)": transposed,
    }
    rates, music21_rate = files_per_second(file_sets, rounds, long_rounds)
    rss = {len(chorales): peak_rss_mib(folders[0]), len(transposed): peak_rss_mib(TRANSPOSED)}
    write_section("Encoding MIDI files (`midigen encode`)", report(rates, music21_rate, rss, rounds, long_rounds),
                  quick=quick)


def multitrack_section(chorales: list[Path], long_rounds: int, quick: bool) -> None:
    multitrack, sources = multitrack_files()
    sources = {"Bach chorales (music21)": chorales, **sources}
    megabytes = sum(path.stat().st_size for path in multitrack) / 1e6
    for path in multitrack:
        path.read_bytes()
    seconds = median_seconds({"midigen": multitrack, "MidiTok REMI": multitrack}, long_rounds)
    rate = {tool: len(multitrack) / secs for tool, secs in seconds.items()}
    write_section("Encoding multi-track MIDI files (instruments, drums, velocities)",
                  multitrack_report(rate, len(multitrack), megabytes, tokens_per_note(sources), long_rounds),
                  quick=quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--time"]:
        time_encoder(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1:2] == ["--rss"]:
        measure_peak_rss(Path(sys.argv[2]))
    else:
        main()
