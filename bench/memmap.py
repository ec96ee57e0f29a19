"""Training from a token store larger than memory (`midigen train --data-location memmap`): memory and tokens/s.

The stores: real music (the Bach chorales, Beethoven quartets and Palestrina of music21's corpus and the
multi-track, prompt and piano files of ../shared/midi where present), encoded once by `encode_files`, then copied
through the store writer in twelve transpositions (-5 ... +6 semitones of the pitched notes, where the song's
notes stay in range) round after round, into a large store of several GB and into a small one a tenth of its
size, which the `cpu` location can load (as int64: 8 bytes per token and array, about 2.7 times the size on disk).

`midigen train` (the command, in its own process, the `tiny` preset so that the data path weighs as much as it can
in the step time) trains for a fixed number of steps: memmap on the large store, memmap and cpu on the small one
(the same data), with random chunks (no memory) and with contiguous song lanes (as memory trains). Memory is read
from /proc every 50 ms: the peak of the process's private memory (RssAnon, what it may not give back) and of the
file pages it has mapped (RssFile: the store's pages it has read, page cache the kernel may reclaim whenever
memory is short), and VmHWM (the two together, the kernel's high-water mark). tokens/s: the median of the trainer's
own logged rates (metrics.jsonl, every 10 steps), the first window (start-up) left out.
Goal: the private memory of memmap training on the large store within 1.2× of that on the small one (bounded:
it does not grow with the store).
`--quick`: stores of about 0.3 GB and 30 MB, fewer steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import CACHE, corpus_files, proc_status_kib, run_sampled, write_section

from midigen.codec.sandbox import EncodedSong
from midigen.data.encode import encode_files
from midigen.data.splits import split_of
from midigen.data.store import StoreWriter, TokenStore

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "midi"
FOLDER = CACHE / "memmap"
SOURCE = FOLDER / "source"
TRANSPOSITIONS = range(-5, 7)
SIZES_GB = {False: (0.3, 3.0), True: (0.03, 0.3)}  # small store (cpu fits), large store
STEPS = {False: 300, True: 60}
BATCHINGS = ("random", "contiguous")
BATCH_SIZE = 16
PRIVATE_GROWTH_GOAL = 1.2


# ---- the stores ---------------------------------------------------------------------------------
def source_store() -> TokenStore:
    """The real songs, encoded once."""
    if not (SOURCE / "report.json").exists():
        shutil.rmtree(SOURCE, ignore_errors=True)
        folders = [SHARED / name for name in ("multitrack", "prompts", "piano") if (SHARED / name).is_dir()]
        files = [path for folder in folders for path in sorted(folder.glob("*.mid"))]
        files += [path for corpus in ("bach-chorales", "beethoven-quartets", "palestrina") for path in corpus_files(corpus)]
        encode_files(files, SOURCE, workers=2, progress=False)
    return TokenStore(SOURCE)


def copied_store(source: TokenStore, gigabytes: float) -> tuple[Path, float]:
    """A store of about `gigabytes` on disk: the source's songs, transposed, round after round; its path and the
    seconds it took to write (0 when it was there)."""
    root = FOLDER / f"store-{gigabytes:g}GB"
    if (root / "report.json").exists():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    dtypes = source.tokenizer.array_dtypes
    bytes_per_token = sum(np.dtype(dtype).itemsize for dtype in dtypes.values())
    pitches = source.tokenizer.transposable_pitches()  # (V,) pitch of each token a transposition moves, else −1
    moves = pitches >= 0
    target_tokens = int(gigabytes * 1e9 / bytes_per_token)
    arrays = {name: np.asarray(array) for name, array in source.arrays.items()}
    with StoreWriter(root, source.config) as writer:
        copy = 0
        while writer.num_tokens < target_tokens:
            shift = TRANSPOSITIONS[copy % len(TRANSPOSITIONS)]
            for entry in source.songs:
                window = slice(entry.start, entry.start + entry.length)
                tokens = arrays["tokens"][window]
                song_pitches = pitches[tokens][moves[tokens]]
                if song_pitches.size and not (0 <= song_pitches.min() + shift and song_pitches.max() + shift < 128):
                    continue  # this song does not fit this transposition
                columns = {name: array[window] for name, array in arrays.items()}
                columns["tokens"] = np.where(moves[tokens], tokens.astype(np.int64) + shift, tokens).astype(dtypes["tokens"])
                packed = b"".join(columns[name].astype(dtype).tobytes() for name, dtype in dtypes.items())
                song = EncodedSong(f"{entry.hash}+{copy}", entry.notes, 0, 0, entry.tempos, entry.time_signatures,
                                   entry.instruments, entry.length, packed)
                writer.add_song(f"{entry.path}#{copy}", split_of(entry.path), song)  # a song keeps its split
                if writer.num_tokens >= target_tokens:
                    break
            copy += 1
        writer.finish()
    return root, time.perf_counter() - start


def store_gigabytes(root: Path) -> float:
    return sum(path.stat().st_size for path in root.iterdir()) / 1e9


# ---- training, measured -------------------------------------------------------------------------
MEASURED = ("VmHWM", "RssAnon", "RssFile")


def train_measured(store: Path, location: str, batching: str, steps: int) -> dict[str, float]:
    run = FOLDER / "run"
    shutil.rmtree(run, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "midigen"), "train", str(store), "-o", str(run), "--preset", "tiny",
               "--data-location", location, "--batching", batching, "--max-steps", str(steps),
               "--batch-size", str(BATCH_SIZE), "--eval-interval", str(10 * steps), "--device", "cpu", "--quiet"]
    _, peaks, _ = run_sampled(command, lambda pid: {name: kib for name, kib in proc_status_kib(pid).items()
                                                    if name in MEASURED})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:]
    return {"tokens_per_s": statistics.median(rates), **{name: peaks.get(name, 0) / 1024 for name in MEASURED}}


# ---- report -------------------------------------------------------------------------------------
def report(stores: dict[str, tuple[Path, float]], runs: dict[tuple[str, str, str], dict[str, float]],
           steps: int, songs: int) -> str:
    sizes = {label: store_gigabytes(root) for label, (root, _) in stores.items()}
    tokens = {label: TokenStore(root).num_tokens for label, (root, _) in stores.items()}
    written = ", ".join(f"the {label} in {seconds:.0f} s" for label, (_, seconds) in stores.items() if seconds)
    lines = [
        f"Stores copied from {songs:,} real songs in twelve transpositions through the store writer"
        + (f" ({written})" if written else "") + ": "
        + "; ".join(f"{label}: {sizes[label]:.2f} GB on disk, {tokens[label] / 1e6:,.0f} M tokens"
                    for label in stores) + ".",
        f"`midigen train STORE --preset tiny --batch-size {BATCH_SIZE} --max-steps {steps} --device cpu "
        "--data-location L --batching B`; peaks of the training process read from /proc.",
        "",
        "| store | location | batching | tokens/s | peak private memory (RssAnon) | peak mapped file pages (RssFile) "
        "| peak RSS (VmHWM) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for (label, location, batching), run in runs.items():
        lines.append(f"| {label} ({sizes[label]:.2f} GB) | {location} | {batching} | {run['tokens_per_s']:,.0f} | "
                     f"{run['RssAnon']:,.0f} MiB | {run['RssFile']:,.0f} MiB | {run['VmHWM']:,.0f} MiB |")
    lines.append("")
    for batching in BATCHINGS:
        small, large = runs[("small", "memmap", batching)], runs[("large", "memmap", batching)]
        cpu = runs[("small", "cpu", batching)]
        growth = large["RssAnon"] / small["RssAnon"]
        met = "met" if growth < PRIVATE_GROWTH_GOAL else "NOT met"
        lines.append(f"{batching.capitalize()} batching: memmap's private memory with a store "
                     f"{sizes['large'] / sizes['small']:.0f}× larger: {growth:.2f}× (goal < {PRIVATE_GROWTH_GOAL:g}×: "
                     f"{met}); memmap's tokens/s against cpu on the same store: "
                     f"{small['tokens_per_s'] / cpu['tokens_per_s']:.2f}×.  ")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small stores and few steps, written to .bench/BENCHMARKS.quick.md, not BENCHMARKS.md")
    args = parser.parse_args()
    source = source_store()
    small_gb, large_gb = SIZES_GB[args.quick]
    stores = {"small": copied_store(source, small_gb), "large": copied_store(source, large_gb)}
    steps = STEPS[args.quick]
    runs = {}
    for batching in BATCHINGS:
        for label, location in (("small", "cpu"), ("small", "memmap"), ("large", "memmap")):
            runs[(label, location, batching)] = train_measured(stores[label][0], location, batching, steps)
    write_section("Training from a store larger than memory (`--data-location memmap`)",
                  report(stores, runs, steps, len(source)), quick=args.quick)


if __name__ == "__main__":
    main()
