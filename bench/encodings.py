"""Which encoding learns best for the same compute? The seed codec, with pitch-class and octave features, with
byte-pair merges across timesteps, against MidiTok's REMI and TSD (with merges), measured in what they cost and in
NLL per note and bits per second (per-token NLL cannot be compared across encodings).

Everything runs through the `midigen` commands a user would type (`encode`, `tokenizer train`, `train`, `eval`,
`generate`, `metrics`), in this process. Per corpus (the Bach chorales; the Beethoven string quartets, one
instrument per part) and per encoding:
- tokens per note on the validation pieces (merges are learned on the training pieces only) and encode files/s;
- training tokens/s, and the validation NLL per token, per note and in bits per second after equal CPU minutes
  (`--max-minutes`) and after equal steps (`--max-steps`), the `small` preset, one run per seed;
- generation notes/s (one lane, from the first bars of a validation piece) and the musical metrics of those
  continuations against the validation pieces (mean overlap area of the metric distributions, 1 = alike).
Goals judged in code: seed + BPE 4,000 at least 2.5x fewer tokens per note than seed; the best midigen encoding at
least 10% lower NLL per note than MidiTok REMI + BPE after equal CPU minutes.

`--pitch-study` instead compares the seed codec and seed + BPE 1,000 with and without pitch-class/octave features,
a merged token taking its first note's values or the sum over its notes (equal CPU minutes, NLL per note);
`--factorised-study` the same encodings with pitch features, with and without the factorised output (a note
predicted as its pitch class, then its octave).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import CACHE, corpus_files, write_section

from midigen.cli.main import main as midigen
from midigen.codec.registry import load_tokenizer
from midigen.data.store import TokenStore
from midigen.inference import SamplingConfig, generate, load_model, load_prompt, write_generation

CORPORA = {"chorales": "bach-chorales", "quartets": "beethoven-quartets"}
BPE_SIZES = (1000, 4000)
PROMPT_BARS = 4
GENERATED_BARS = 8
PROMPTS = 4  # validation pieces continued per run for generation speed and metrics


@dataclass(frozen=True)
class Encoding:
    name: str
    tokenizer: str  # `encode --tokenizer`
    bpe: int | None = None  # `tokenizer train --vocab`
    pitch_features: bool = False  # `train --pitch-features`
    merged_notes: str = "sum"  # `train --merged-notes`
    factorised: bool = False  # `train --factorised-output`
    ours: bool = True  # a midigen encoding (the goal compares the best of these with REMI + BPE)

    @property
    def store_name(self) -> str:
        return f"{self.tokenizer}-bpe{self.bpe}" if self.bpe else self.tokenizer

    @property
    def run_name(self) -> str:
        name = self.store_name
        if self.pitch_features:
            name += f"-pc-{self.merged_notes}" if self.bpe else "-pc"
        return name + "-factorised" if self.factorised else name

    @property
    def train_options(self) -> list[str]:
        options = ["--pitch-features", "--merged-notes", self.merged_notes] if self.pitch_features else []
        return options + ["--factorised-output"] if self.factorised else options


SEED_PC = Encoding("seed + pitch class/octave", "seed", pitch_features=True)
BPE_PC = Encoding("seed + BPE 1,000 + pitch class/octave summed over the notes", "seed", bpe=1000, pitch_features=True)
ENCODINGS = (
    Encoding("seed", "seed"),
    SEED_PC,
    *(Encoding(f"seed + BPE {size:,}", "seed", bpe=size) for size in BPE_SIZES),
    Encoding("MidiTok REMI", "remi", ours=False),
    Encoding("MidiTok REMI + BPE 4,000", "remi", bpe=4000, ours=False),
    Encoding("MidiTok TSD + BPE 4,000", "tsd", bpe=4000, ours=False),
)
# pitch-class/octave features with and without merges, and which values a merged token takes
PITCH_STUDY = (
    Encoding("seed", "seed"),
    SEED_PC,
    Encoding("seed + BPE 1,000", "seed", bpe=1000),
    Encoding("seed + BPE 1,000 + pitch class/octave of the first note", "seed", bpe=1000, pitch_features=True,
             merged_notes="first"),
    BPE_PC,
)
# the factorised output, against each encoding's best so far (with pitch features)
FACTORISED_STUDY = (
    SEED_PC,
    Encoding("seed + pitch class/octave + factorised output", "seed", pitch_features=True, factorised=True),
    BPE_PC,
    Encoding("seed + BPE 1,000 + pitch class/octave + factorised output", "seed", bpe=1000, pitch_features=True,
             factorised=True),
)


@dataclass(frozen=True)
class Study:
    """Encodings compared after equal CPU minutes only, with several seeds, and which pairs the verdicts compare."""

    title: str
    encodings: tuple[Encoding, ...]
    comparisons: tuple[tuple[int, int], ...]  # (a, b): encoding a's NLL per note against encoding b's
    explanation: str


STUDIES = {
    "pitch": Study("Pitch-class and octave features, with and without merges", PITCH_STUDY,
                   ((1, 0), (3, 2), (4, 2), (4, 3)),
                   "A merged token holding several notes takes the pitch class and octave of its first note, or the "
                   "sum of the embeddings of all its notes' (`train --merged-notes`)."),
    "factorised": Study("Factorised output: pitch class, then octave", FACTORISED_STUDY, ((1, 0), (3, 2)),
                        "With the factorised output (`train --factorised-output`) a note token is predicted as "
                        "note, then its pitch class, then its octave; merged tokens keep one output each."),
}
REMI_BPE = "MidiTok REMI + BPE 4,000"
SEED_BPE = "seed + BPE 4,000"


def run(*args: str) -> None:
    code = midigen([*map(str, args)])
    if code != 0:
        raise SystemExit(f"midigen {' '.join(map(str, args))} exited {code}")


def timed(store: Path, *command: object) -> float:
    """Seconds `midigen *command` took to write `store`, measured when it ran (kept beside the store)."""
    record = store.with_name(f"{store.name}.seconds")
    if not record.exists():
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        run(*command)
        record.write_text(f"{time.perf_counter() - start}\n")
    return float(record.read_text())


def build_store(encoding: Encoding, files: list[Path], folder: Path) -> tuple[Path, float]:
    """The encoding's store of `files` (merges learned on its training split) and the encode files/s (with
    merges: encoding, learning the merges and applying them)."""
    base = folder / encoding.tokenizer
    seconds = timed(base, "encode", *files, "-o", base, "--tokenizer", encoding.tokenizer, "--quiet")
    if not encoding.bpe:
        return base, len(files) / seconds
    store = folder / encoding.store_name
    seconds += timed(store, "tokenizer", "train", base, "--vocab", encoding.bpe, "-o", store, "--quiet")
    return store, len(files) / seconds


def tokens_per_note(store: TokenStore, split: str = "val") -> float:
    songs = store.split_indices(split)
    return int(store.songs.lengths[songs].sum()) / int(store.songs.notes[songs].sum())


def train_and_score(encoding: Encoding, store: Path, run_dir: Path, budget: list[str], seed: int) -> dict[str, float]:
    """Train and score a run, or read the scores of the finished run in `run_dir` (a rerun after an interruption
    goes on from the runs it finished)."""
    out = run_dir / "eval.json"
    if not out.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run("train", store, "-o", run_dir, "--preset", "small", "--seed", seed, "--device", "cpu", "--batching",
            "random", *budget, *encoding.train_options, "--quiet")
        run("eval", run_dir, "--data", store, "--device", "cpu", "--json", out)
    scores = json.loads(out.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
    return {"nll": scores["nll"], "nll_per_note": scores["nll_per_note"], "bits_per_second": scores["bits_per_second"],
            "steps": max(row["step"] for row in rows), "tokens_per_s": statistics.median(speeds) if speeds else float("nan")}


def generation_figures(run_dir: Path, store: TokenStore, folder: Path) -> dict[str, float]:
    """Notes per second of generation (one lane) and the metrics' mean overlap with all the corpus's pieces (a
    corpus with one validation piece, the quartets, would give one value per metric: an overlap of two single values
    is the same whatever they are)."""
    trained = load_model(run_dir, "cpu")
    tokenizer = load_tokenizer(trained.tokenizer)
    note_counts = tokenizer.note_counts()
    validation = [Path(store.songs[i].path) for i in store.split_indices("val")]
    prompts = [validation[i % len(validation)] for i in range(PROMPTS)]  # each continued with its own seed
    out = folder / "generated"
    out.mkdir(exist_ok=True)
    notes, seconds = 0, 0.0
    for index, path in enumerate(prompts):
        prompt = load_prompt(path, PROMPT_BARS, tokenizer)
        start = time.perf_counter()
        generation = generate(trained, prompt, SamplingConfig(seed=index), bars=GENERATED_BARS)
        seconds += time.perf_counter() - start
        notes += int(note_counts[generation.sequence.tokens[generation.prompt_length:]].sum())
        write_generation(generation, tokenizer, out / f"{index}.mid")
    metrics = folder / "metrics.json"
    pieces = [song.path for song in store.songs]
    run("metrics", out, "--reference", *pieces, "--continuation-only", "--json", metrics, "--quiet")
    comparison = json.loads(metrics.read_text())["comparison"]
    overlaps = [scores["overlap_area"] for scores in comparison.values() if scores]
    return {"notes_per_s": notes / seconds, "overlap": float(np.mean(overlaps)) if overlaps else float("nan")}


def measure(corpus: str, encoding: Encoding, budgets: dict[str, float], seeds: int, folder: Path,
            generation: bool = True) -> dict[str, object]:
    """Figures of `encoding` on `corpus`, one run per seed and budget ({"minutes": m, "steps": s}); with
    `generation`, generation speed and metrics from the first seed's minutes run."""
    files = corpus_files(CORPORA[corpus])
    store_dir, files_per_s = build_store(encoding, files, folder / corpus)
    store = TokenStore(store_dir)
    result: dict[str, object] = {"tokens_per_note": tokens_per_note(store), "encode_files_per_s": files_per_s}
    for name, value in budgets.items():
        runs = []
        for seed in range(seeds):
            run_dir = folder / corpus / "runs" / f"{encoding.run_name}-{value:g}{name}-{seed}"
            budget = [f"--max-{name}", value]
            runs.append(train_and_score(encoding, store_dir, run_dir, budget, seed))
            if generation and name == "minutes" and seed == 0:
                result |= generation_figures(run_dir, store, run_dir)
        result[name] = runs
    return result


def spread(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(corpus: str, by_encoding: dict[str, dict[str, object]], minutes: float, steps: int, seeds: int) -> str:
    lines = [f"The {corpus}: `small` preset, random chunks, seeds 0..{seeds - 1}; equal CPU minutes: {minutes:g} min "
             f"of training each; equal steps: {steps}. NLL per note and bits per second are comparable across "
             f"encodings; NLL per token is not. Generation: one lane, the first {PROMPT_BARS} bars of {PROMPTS} "
             f"validation pieces (taken again, with another seed, when there are fewer) continued {GENERATED_BARS} "
             "bars; overlap: the mean overlap area of the musical metrics' distributions against all the corpus's "
             "pieces (1 = alike).", "",
             "| encoding | tokens/note | encode files/s | train tokens/s | steps in the minutes | NLL/token "
             "(minutes) | NLL/note (minutes) | bits/s (minutes) | NLL/note (steps) | bits/s (steps) | "
             "generation notes/s | metrics overlap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in by_encoding.items():
        mins, stps = r["minutes"], r["steps"]
        lines.append(
            f"| {name} | {r['tokens_per_note']:.2f} | {r['encode_files_per_s']:.0f} | "
            f"{statistics.mean(x['tokens_per_s'] for x in mins):.0f} | "
            f"{statistics.mean(x['steps'] for x in mins):.0f} | {spread([x['nll'] for x in mins])} | "
            f"{spread([x['nll_per_note'] for x in mins])} | {spread([x['bits_per_second'] for x in mins], 1)} | "
            f"{spread([x['nll_per_note'] for x in stps])} | {spread([x['bits_per_second'] for x in stps], 1)} | "
            f"{r['notes_per_s']:.0f} | {r['overlap']:.3f} |")
    seed_tpn, bpe_tpn = by_encoding["seed"]["tokens_per_note"], by_encoding[SEED_BPE]["tokens_per_note"]
    ratio = seed_tpn / bpe_tpn
    ours = {name: statistics.mean(x["nll_per_note"] for x in r["minutes"])
            for name, r in by_encoding.items() if next(e for e in ENCODINGS if e.name == name).ours}
    best = min(ours, key=ours.get)
    remi = statistics.mean(x["nll_per_note"] for x in by_encoding[REMI_BPE]["minutes"])
    gain = 1 - ours[best] / remi
    return "\n".join(lines + [
        "", "Goals:",
        f"- seed + BPE 4,000 writes {ratio:.2f}x fewer tokens per note than seed ({bpe_tpn:.2f} against "
        f"{seed_tpn:.2f}; goal at least 2.5x): **{'met' if ratio >= 2.5 else 'NOT met'}**.",
        f"- the best midigen encoding after equal CPU minutes, {best}, has {gain:.1%} lower NLL per note than MidiTok "
        f"REMI + BPE 4,000 ({ours[best]:.3f} against {remi:.3f} nats; goal at least 10%): "
        f"**{'met' if gain >= 0.10 else 'NOT met'}**."])


def study_report(study: Study, corpus: str, by_encoding: dict[str, dict[str, object]], minutes: float,
                 seeds: int) -> str:
    lines = [f"The {corpus}: `small` preset, random chunks, {minutes:g} CPU minutes of training per run, seeds "
             f"0..{seeds - 1}: validation NLL per note (nats), mean ± standard deviation over the seeds, then seed by "
             f"seed. {study.explanation}", "",
             "| encoding | tokens/note | NLL/note | seed by seed | steps in the minutes |", "|---|---|---|---|---|"]
    for name, r in by_encoding.items():
        nll = [x["nll_per_note"] for x in r["minutes"]]
        lines.append(f"| {name} | {r['tokens_per_note']:.2f} | {spread(nll)} | " + " / ".join(f"{x:.3f}" for x in nll)
                     + f" | {statistics.mean(x['steps'] for x in r['minutes']):.0f} |")
    names = [encoding.name for encoding in study.encodings]
    verdicts = [comparison(by_encoding, names[a], names[b]) for a, b in study.comparisons
                if names[a] in by_encoding and names[b] in by_encoding]
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def comparison(by_encoding: dict[str, dict[str, object]], name: str, against: str) -> str:
    """How much lower `name`'s mean NLL per note is than `against`'s, and whether the gap exceeds both spreads."""
    runs = {key: [x["nll_per_note"] for x in by_encoding[key]["minutes"]] for key in (name, against)}
    gap = statistics.mean(runs[against]) - statistics.mean(runs[name])
    spreads = [statistics.stdev(values) if len(values) > 1 else float("nan") for values in runs.values()]
    verdict = ("beyond the seeds' spread" if all(abs(gap) > s for s in spreads) else "within the seeds' spread"
               if len(runs[name]) > 1 else "one seed: spread unknown")
    return f"- {name} against {against}: {abs(gap):.3f} nats per note {'lower' if gap > 0 else 'higher'} ({verdict})."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes per run (default 5)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--corpus", choices=sorted(CORPORA), action="append", help="default: both")
    parser.add_argument("--quick", action="store_true", help="check that the bench runs (tiny budgets, one seed)")
    studies = parser.add_mutually_exclusive_group()
    studies.add_argument("--pitch-study", action="store_const", dest="study", const="pitch",
                         help="instead: pitch-class/octave features with and without merges, first note or sum "
                              "(equal minutes only)")
    studies.add_argument("--factorised-study", action="store_const", dest="study", const="factorised",
                         help="instead: the factorised output against one output per token, with pitch features "
                              "(equal minutes only)")
    parser.add_argument("--encoding", action="append", metavar="NAME",
                        help="with a study: only this encoding of it (repeatable; default: all)")
    args = parser.parse_args()
    study = STUDIES.get(args.study)
    chosen = study.encodings if study else ENCODINGS
    if args.encoding and not study:
        parser.error("--encoding selects encodings of a study (the table's goals need all of its encodings)")
    if args.encoding:
        unknown = sorted(set(args.encoding) - {encoding.name for encoding in chosen})
        if unknown:
            parser.error(f"unknown encoding(s) {unknown}; choose from {[encoding.name for encoding in chosen]}")
        chosen = tuple(encoding for encoding in chosen if encoding.name in args.encoding)
    minutes, steps, seeds = (0.1, 5, 1) if args.quick else (args.minutes, args.steps, args.seeds)
    corpora = args.corpus or list(CORPORA)
    folder = CACHE / ("tokenizers-quick" if args.quick else "tokenizers")  # stores and runs, reused when rerun
    for corpus in corpora:  # a section per corpus, so that `--corpus` refreshes one and keeps the other
        if study:
            results = {encoding.name: measure(corpus, encoding, {"minutes": minutes}, seeds, folder, generation=False)
                       for encoding in chosen}
            write_section(f"{study.title} ({corpus})", study_report(study, corpus, results, minutes, seeds),
                          quick=args.quick)
        else:
            results = {encoding.name: measure(corpus, encoding, {"minutes": minutes, "steps": steps}, seeds, folder)
                       for encoding in chosen}
            write_section(f"Tokenizers ({corpus}): tokens per note, and NLL per note for equal compute",
                          report(corpus, results, minutes, steps, seeds), quick=args.quick)


if __name__ == "__main__":
    main()
