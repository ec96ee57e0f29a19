"""Does memory help, and what does it cost? `none` vs `xl` vs `knn` on long pieces.

Quality: the bundled Beethoven string quartets and Palestrina works, keeping only pieces at least
4× longer than the context. The same model size, data stream (contiguous song batching with the
same seed for all three, so every mode sees the same tokens in the same order) and number of
steps for `none`, `xl` and `knn`; then validation NLL over every token of the long validation
pieces, also by position inside the context window and inside the piece, and on the recall tokens (repeats of
passages beyond the xl model's reach, which only the kNN memory can copy; goal: knn's recall NLL at least 20%
below none's and 10% below xl's) against the others. Each mode is trained
with several seeds (a seed sets the initial weights and the order of the batches), since a single
run's validation NLL also moves with its seed.

Runs are cached in .bench/memory/ and reused only when trained from the same midigen sources (model,
memories, batching, training), token store, configs and torch and faiss versions: each run folder's
bench.json records that key, and when and on what CPU the run was trained; the section says which
runs were reused and from when, and notes runs trained while a known defect, since fixed, was there.

Cost: CPU step time of `xl` and `knn` relative to `none` (same model, same batch, memories full),
and kNN search time per step against the number of entries per lane.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import CACHE, QUICK_BENCHMARKS, corpus_files, cpu_name, median_seconds, write_section

import midigen
from midigen.codec import TokenizerConfig
from midigen.data.batching import SongLanes, TokenArrays
from midigen.data.batching import model_inputs
from midigen.data.encode import encode_files
from midigen.data.store import TokenStore
from midigen.evaluation.nll import score_songs
from midigen.evaluation.recall import recall_targets
from midigen.inference.model_files import CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, load_model
from midigen.io_utils import atomic_write_text
from midigen.model import ModelConfig, MusicTransformer
from midigen.model.memory import KnnMemory, MemoryState
from midigen.training.config import TrainConfig
from midigen.training.host_memory import keep_freed_memory
from midigen.training.recipe import train

CORPORA = ("beethoven-quartets", "palestrina")
CONTEXT = 128
LANES = 8
LAYERS = 4  # the quality runs' depth unless --layers says otherwise
MODES = ("none", "xl", "knn")
RETRIEVAL_OFF = "knn, retrieval off"  # the knn model scored without what its search finds
WINDOW_BUCKETS = ((0, 16), (16, 64), (64, CONTEXT))
PIECE_BUCKETS = ((0, 4 * CONTEXT), (4 * CONTEXT, 16 * CONTEXT), (16 * CONTEXT, 10**9))
QUALITY_GOAL = -0.03  # knn's change of validation NLL against none
RECALL_GOALS = {"none": -0.20, "xl": -0.10}  # knn's change of recall NLL against each of these modes
TOKENIZER = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)  # single voices' timbres: no instruments


def model_config(memory: str, layers: int = LAYERS) -> ModelConfig:
    # 128 wide; the kNN layer is the one below the top, near the output as in Memorizing Transformers
    return ModelConfig.preset("small", TOKENIZER, d_model=128, n_layers=layers, n_heads=4, context=CONTEXT,
                              memory=memory, knn_layer=-2)


def long_piece_store(root: Path) -> TokenStore:
    """Export the corpora, and encode the pieces at least 4× longer than the context."""
    store_dir = root / "store-long"
    if (store_dir / "report.json").exists():
        return TokenStore(store_dir)
    files: list[Path] = []
    for name in CORPORA:
        files += corpus_files(name)
    survey = root / "store-survey"
    shutil.rmtree(survey, ignore_errors=True)
    encode_files(files, survey, TOKENIZER)
    long_paths = [s.path for s in TokenStore(survey).songs if s.length >= 4 * CONTEXT]
    encode_files(long_paths, store_dir, TOKENIZER)
    shutil.rmtree(survey)
    return TokenStore(store_dir)


def recall_reach(layers: int = LAYERS) -> int:
    """The reach beyond which a token counts as recall, the same for every mode: the xl model's (its window plus
    its XL memory), so that all modes are scored on the same tokens, none of which local or XL attention sees."""
    return model_config("xl", layers).reach


def lane_recall(recall: dict[int, np.ndarray], songs: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """(B, length) bool: which targets of each lane's row are recall tokens (`recall`: per song, by position)."""
    rows = np.zeros((len(songs), length), dtype=bool)
    for lane, (song, offset) in enumerate(zip(songs.tolist(), offsets.tolist())):
        if song >= 0:
            targets = recall[song][offset + 1 : offset + 1 + length]  # a row's targets start one past its offset
            rows[lane, : targets.size] = targets
    return rows


def nll_by_position(run: Path, store: TokenStore, retrieval: bool = True, layers: int = LAYERS) -> dict[str, float]:
    """Mean NLL by corpus, by position in the window and in the piece, and on the recall tokens and the others
    (`recall` / `other`; `recall tokens`: how many)."""
    trained = load_model(run, "cpu")
    if not retrieval:  # the kNN model's own network: its gate shut, the kNN layer attends only locally
        trained.model.blocks[trained.model_config.knn_layer_index].attn.gate.data.fill_(-1e4)
    data = TokenArrays(store, "memmap")
    songs = store.split_indices("val")
    songs_of = {corpus: [i for i in songs if Path(store.songs[i].path).parent.name == corpus] for corpus in CORPORA}
    recall = {song: recall_targets(store.song(song).tokens, recall_reach(layers)) for song in songs}
    totals: dict[str, list[float]] = {}
    for batch, nll in score_songs(trained.model, data, songs, LANES, torch.device("cpu")):
        scored = (batch["tokens"][:, 1:] != 0).numpy()
        column = np.broadcast_to(np.arange(CONTEXT), scored.shape)
        in_piece = batch["offset"].numpy()[:, None] + column + 1
        values = nll.numpy()
        groups = {"all": scored}
        groups |= {corpus: scored & np.isin(batch["song"].numpy(), songs_of[corpus])[:, None] for corpus in CORPORA}
        groups |= {f"window {a}-{b}": scored & (column >= a) & (column < b) for a, b in WINDOW_BUCKETS}
        groups |= {f"piece {a}-{b if b < 10**9 else 'end'}": scored & (in_piece >= a) & (in_piece < b)
                   for a, b in PIECE_BUCKETS}
        is_recall = lane_recall(recall, batch["song"].numpy(), batch["offset"].numpy(), CONTEXT)
        groups |= {"recall": scored & is_recall, "other": scored & ~is_recall}
        for name, mask in groups.items():
            total = totals.setdefault(name, [0.0, 0])
            total[0] += float(values[mask].sum())
            total[1] += int(mask.sum())
    return {name: s / n for name, (s, n) in totals.items() if n} | {"recall tokens": totals["recall"][1]}


def training_minutes(run: Path) -> float:
    """Wall time of the training run, from the last line its trainer logged."""
    last = (run / "metrics.jsonl").read_text().strip().splitlines()[-1]
    return json.loads(last)["elapsed_s"] / 60


def run_folder(root: Path, mode: str, steps: int, seed: int, layers: int) -> Path:
    parent = root if layers == LAYERS else root / f"{layers}-layers"
    return parent / (f"run-{mode}-{steps}" if seed == 0 else f"run-{mode}-{steps}-seed{seed}")


def train_config(steps: int, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=LANES, batching="contiguous", eval_interval=steps,
                       warmup_steps=100, device="cpu", seed=seed)


TRAINING_SOURCES = ("model/*.py", "data/batching.py", "training/*.py")  # in the midigen package
RUN_RECORD = "bench.json"  # in each run folder the bench trained


def sources_hash() -> str:
    """A hash of the midigen sources that decide what a run learns: the model and its memories, batching, training."""
    package = Path(midigen.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(path for pattern in TRAINING_SOURCES for path in package.glob(pattern)):
        digest.update(f"{path.relative_to(package)}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def run_key(sources: str, store_identity: str, model: ModelConfig, training: TrainConfig) -> str:
    """What a run's weights depend on: midigen's sources, the store, the configs, the torch and faiss running them."""
    import faiss  # imported by midigen.model.memory already, after torch

    parts = {"sources": sources, "store": store_identity, "model": model.to_dict(), "train": training.to_dict(),
             "torch": torch.__version__, "faiss": faiss.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """Where a scored run came from (its folder's bench.json). A run adopted with --reuse-unkeyed has no bench.json:
    its sources, CPU and jobs are unknown, and `trained` is when its log was last written."""

    trained: dt.datetime  # when its training ended, UTC
    key: str | None = None
    sources: str | None = None
    cpu: str | None = None
    jobs: int | None = None  # runs trained side by side, the cores shared

    @classmethod
    def read(cls, run: Path) -> RunRecord | None:
        path = run / RUN_RECORD
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(dt.datetime.fromisoformat(data["trained"]), data["key"], data["sources"], data["cpu"], data["jobs"])


def reusable_record(run: Path, steps: int, key: str, adopt_unkeyed: bool) -> RunRecord | None:
    """The record of `run` if it is finished and was trained from `key` (with adopt_unkeyed, also if it predates
    the records), else None: it is to be trained afresh."""
    if adopt_unkeyed and (run / LEGACY_CHECKPOINT_FILE).exists():
        raise SystemExit(f"memory.py: {run} holds a pickled run of an older midigen; `midigen convert-run {run}` "
                         "converts it, so that it can be reused")
    if not (run / CHECKPOINT_FILE).exists() or load_model(run).step < steps:
        return None
    record = RunRecord.read(run)
    if record is None and adopt_unkeyed:
        return RunRecord(dt.datetime.fromtimestamp((run / "metrics.jsonl").stat().st_mtime, dt.timezone.utc))
    return record if record is not None and record.key == key else None


def train_run(store_root: Path, run: Path, model: ModelConfig, training: TrainConfig, key: str, sources: str,
              jobs: int) -> None:
    shutil.rmtree(run, ignore_errors=True)
    train(store_root, run, model, training)
    record = {"key": key, "sources": sources, "trained": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "jobs": jobs}
    atomic_write_text(run / RUN_RECORD, json.dumps(record, indent=2) + "\n")  # last: the run is complete


def share_cores(threads: int) -> None:
    import faiss  # here, not at the top: midigen.model.memory imports it after torch, as it must be

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


Run = tuple[str, int]  # (mode, seed)


def trained_runs(root: Path, store: TokenStore, steps: int, seeds: int, layers: int, jobs: int,
                 adopt_unkeyed: bool) -> tuple[dict[Run, RunRecord], list[Run]]:
    """Train every mode and seed without a reusable run, `jobs` runs at a time on a share of the cores each; the
    records of all runs, and the runs trained now.

    Small models use two cores poorly: two single-threaded runs side by side finish 13% sooner than one after
    the other on two threads (150-step knn runs, 2 cores), though each run's own training minutes are longer."""
    sources, identity = sources_hash(), store.identity()
    plans = {}  # seed by seed, so that an interrupted bench can still score the first seeds; the slowest mode first
    for seed in range(seeds):
        for mode in reversed(MODES):
            model, training = model_config(mode, layers), train_config(steps, seed)
            plans[mode, seed] = (run_folder(root, mode, steps, seed, layers), model, training,
                                 run_key(sources, identity, model, training))
    records = {name: record for name, (run, *_, key) in plans.items()
               if (record := reusable_record(run, steps, key, adopt_unkeyed)) is not None}
    missing = [name for name in plans if name not in records]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawned, not forked: a fork of a process whose OpenMP threads have run can hang
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), share_cores, (threads,)) as pool:
        for done in [pool.submit(train_run, store.root, *plans[name], sources, jobs) for name in missing]:
            done.result()
    records |= {name: RunRecord.read(plans[name][0]) for name in missing}
    return records, missing


def describe_runs(runs: list[Run]) -> str:
    """"every mode with seeds 0, 1", or mode by mode: "knn with seed 2; xl with seeds 0, 1"."""
    seeds_of = {mode: sorted(seed for m, seed in runs if m == mode) for mode in MODES}
    seeds_of = {mode: seeds for mode, seeds in seeds_of.items() if seeds}
    listed = {mode: ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
              for mode, seeds in seeds_of.items()}
    if len(listed) == len(MODES) and len(set(listed.values())) == 1:
        return f"every mode with {listed[MODES[0]]}"
    return "; ".join(f"{mode} with {seeds}" for mode, seeds in listed.items())


def when(records: list[RunRecord]) -> str:
    first, last = min(r.trained for r in records), max(r.trained for r in records)
    start, end = f"{first:%Y-%m-%d %H:%M}", f"{last:%Y-%m-%d %H:%M}"
    if start == end:
        return f"{start} UTC"
    return f"{start} to {end[11:] if start[:10] == end[:10] else end} UTC"


def runs_paragraph(records: dict[Run, RunRecord], trained_now: list[Run]) -> str:
    """Which runs were trained now and which reused, from when, on what CPU; whether their minutes compare."""
    groups: dict[tuple, list[Run]] = {}
    for name, record in records.items():
        groups.setdefault((name in trained_now, record.key is not None, record.sources, record.cpu, record.jobs),
                          []).append(name)
    sentences = []
    for (now, keyed, sources, cpu, jobs), runs in sorted(groups.items(), key=lambda item: not item[0][0]):
        period = when([records[name] for name in runs])
        if not keyed:
            sentences.append(f"Reused with `--reuse-unkeyed` from before the bench recorded what a run was trained "
                             f"from: the runs of {describe_runs(runs)} (logs last written {period}; sources, CPU and "
                             f"runs side by side not recorded).")
            continue
        where = f"sources {sources[:12]}, {cpu}, {jobs} run{'s' if jobs > 1 else ''} at a time"
        if now:
            sentences.append(f"Trained in this invocation: the runs of {describe_runs(runs)} ({where}; {period}).")
        else:
            sentences.append(f"Reused from earlier invocations, trained from the same sources, store and configs: the "
                             f"runs of {describe_runs(runs)} ({where}; {period}).")
    machines = {(record.cpu, record.jobs) for record in records.values()}
    if len(machines) > 1:
        sentences.append("Training minutes of runs trained on different CPUs, or with a different number of runs side "
                         "by side (or either not recorded), do not compare.")
    return " ".join(sentences + defect_notes(records))


@dataclass(frozen=True)
class KnownDefect:
    """A fault, fixed since, that touched some figures of the runs trained while it was there."""

    modes: tuple[str, ...]
    since: dt.datetime
    fixed: dt.datetime
    effect: str


UTC = dt.timezone.utc
KNOWN_DEFECTS = (
    # bench/memory.py imported faiss at the top from after 5417852 (whose runs it did not touch) until a7d300e
    KnownDefect(("knn",), dt.datetime(2026, 12, 1, 14, 14, tzinfo=UTC), dt.datetime(2026, 12, 1, 16, 43, tzinfo=UTC),
                "the bench imported faiss before torch, which made each kNN search about 8× slower (fixed in "
                "a7d300e; README): their training minutes are inflated; their NLL is not affected"),
)


def defect_notes(records: dict[Run, RunRecord]) -> list[str]:
    notes = []
    for defect in KNOWN_DEFECTS:
        touched = [name for name, record in records.items()
                   if name[0] in defect.modes and defect.since <= record.trained < defect.fixed]
        if touched:
            notes.append(f"**Known defect:** the runs of {describe_runs(touched)} were trained between "
                         f"{defect.since:%Y-%m-%d %H:%M} and {defect.fixed:%H:%M} UTC, while {defect.effect}.")
    return notes


def quality(root: Path, steps: int, seeds: int, layers: int, jobs: int, adopt_unkeyed: bool) -> str:
    store = long_piece_store(root)
    records, trained_now = trained_runs(root, store, steps, seeds, layers, jobs, adopt_unkeyed)
    lengths = [s.length for s in store.songs]
    val_corpora = Counter(Path(store.songs[i].path).parent.name for i in store.split_indices("val"))
    scores: dict[str, list[dict[str, float]]] = {}  # per mode, one table row per seed
    minutes: dict[str, list[float]] = {}
    for mode in MODES:
        runs = [run_folder(root, mode, steps, seed, layers) for seed in range(seeds)]
        minutes[mode] = [training_minutes(run) for run in runs]
        scores[mode] = [nll_by_position(run, store, layers=layers) for run in runs]
        if mode == "knn":
            scores[RETRIEVAL_OFF] = [nll_by_position(run, store, retrieval=False, layers=layers) for run in runs]
    names = [name for name in scores["none"][0] if name not in RECALL_FIGURES]
    mean = {mode: {n: float(np.mean([row[n] for row in rows])) for n in names} for mode, rows in scores.items()}
    header = "| mode | " + " | ".join(names) + " | all, seed by seed | training minutes |"
    rows = [header, "|---" * (len(names) + 3) + "|"]
    for mode in scores:
        training = f"{np.mean(minutes[mode]):.1f}" if mode in minutes else "(the knn runs)"
        by_seed = " / ".join(f"{row['all']:.4f}" for row in scores[mode])
        rows.append(f"| {mode} | " + " | ".join(f"{mean[mode][n]:.4f}" for n in names) + f" | {by_seed} | {training} |")
    none, xl, knn = (mean[m]["all"] for m in MODES)
    per_seed = list(zip(*(scores[m] for m in MODES)))  # (none, xl, knn) rows of each seed
    ordered = sum(k["all"] <= x["all"] < n["all"] for n, x, k in per_seed)
    knn_gains = sum(k["all"] <= (1 + QUALITY_GOAL) * n["all"] for n, _, k in per_seed)
    knn_change = (knn - none) / none
    spread = max(max(r["all"] for r in scores[m]) / min(r["all"] for r in scores[m]) - 1 for m in MODES)
    verdict = (f"Ordered knn ≤ xl < none (means over seeds): **{'yes' if knn <= xl < none else 'no'}**, "
               f"and with {ordered} of {seeds} seeds; NLL change against none: xl **{100 * (xl - none) / none:+.1f}%**, "
               f"knn **{100 * knn_change:+.1f}%** (goal: knn at most {100 * QUALITY_GOAL:+.1f}%: "
               f"**{'met' if knn_change <= QUALITY_GOAL else 'NOT met'}**; met with {knn_gains} of {seeds} seeds). "
               f"The same mode trained with another seed moved by up to {100 * spread:.1f}%.")
    return (
        f"{len(store)} pieces of {', '.join(CORPORA)} at least {4 * CONTEXT} tokens long "
        f"(median {int(np.median(lengths))}, longest {max(lengths)} tokens); "
        f"{len(store.split_indices('train'))} train, {len(store.split_indices('val'))} validation ("
        + ", ".join(f"{n} {corpus}" for corpus, n in sorted(val_corpora.items())) + "). "
        f"Model: {layers} layers × 128 wide, 4 heads, context {CONTEXT}, XL memory of one segment, kNN on layer "
        f"{model_config('knn', layers).knn_layer_index + 1} "
        f"(top-32, up to 65,536 entries per lane). {steps} steps of {LANES} lanes (contiguous batching), CPU, "
        f"each mode trained {seeds} times with seeds 0 to {seeds - 1} (a seed sets the initial weights and the "
        f"order of the batches, the same for every mode).\n\n"
        "Validation NLL (nats per token) over every token of the validation pieces, by corpus, and by position "
        "of the predicted token inside the context window and inside the piece: the mean over the seeds, and the "
        "whole-set figure of each seed. The last row scores the knn models with their gate shut, so that their "
        "kNN layer attends only locally: their own network without what the search finds. Training minutes are "
        "each run's own wall time; runs trained side by side (`--jobs`) share the cores, and each takes longer.\n\n"
        + "\n".join(rows) + "\n\n" + verdict + "\n\n" + recall_paragraph(scores, layers) + "\n\n"
        + runs_paragraph(records, trained_now)
    )


RECALL_FIGURES = ("recall", "other", "recall tokens")  # nll_by_position's figures of the recall paragraph


def recall_paragraph(scores: dict[str, list[dict[str, float]]], layers: int) -> str:
    """Recall NLL against the other tokens' NLL per mode, and the goal judged: knn's recall NLL at least 20% below
    none's and 10% below xl's (means over the seeds, and seed by seed)."""
    mean = {mode: {name: float(np.mean([row[name] for row in rows])) for name in ("recall", "other")}
            for mode, rows in scores.items()}
    rows = ["| mode | recall NLL | other NLL | recall − other | recall NLL, seed by seed |", "|---|---|---|---|---|"]
    for mode, runs in scores.items():
        by_seed = " / ".join(f"{row['recall']:.4f}" for row in runs)
        rows.append(f"| {mode} | {mean[mode]['recall']:.4f} | {mean[mode]['other']:.4f} | "
                    f"{mean[mode]['recall'] - mean[mode]['other']:+.4f} | {by_seed} |")
    judged = []
    for mode, goal in RECALL_GOALS.items():
        change = (mean["knn"]["recall"] - mean[mode]["recall"]) / mean[mode]["recall"]
        seeds_met = sum((k["recall"] - m["recall"]) / m["recall"] <= goal for k, m in zip(scores["knn"], scores[mode]))
        judged.append(f"against {mode} **{100 * change:+.1f}%** (goal at most {100 * goal:+.0f}%: "
                      f"**{'met' if change <= goal else 'NOT met'}**; met with {seeds_met} of {len(scores[mode])} seeds)")
    tokens = int(scores["none"][0]["recall tokens"])  # the same tokens for every mode and seed
    return (f"Recall (`midigen.evaluation.recall`): the {tokens:,} validation targets that end a passage of 16 tokens "
            f"repeating one last seen more than {recall_reach(layers)} tokens back (the xl model's window plus XL "
            "memory, for every mode alike, so that all are scored on the same tokens): only a long-term memory can "
            "copy them. NLL on them and on the other targets, the mean over the seeds:\n\n" + "\n".join(rows)
            + "\n\nknn's recall NLL " + ", ".join(judged) + ".")


MEMORY_TOKENS = 2048  # tokens each lane has seen when a step is timed
STEP_ROUNDS = 15
COST_GOALS = {"xl": 1.2, "knn": 1.5}  # step time relative to none


def pieces_for_steps(store: TokenStore, lanes: int, context: int) -> tuple[TokenArrays, np.ndarray]:
    """The store's arrays, and the first `lanes` training pieces long enough for the warm-up and the timed step."""
    needed = MEMORY_TOKENS + 2 * context + 1
    songs = [i for i in store.split_indices("train") if store.songs[i].length >= needed][:lanes]
    if len(songs) < lanes:
        raise SystemExit(f"memory.py: {len(songs)} training pieces have {needed} tokens; {lanes} lanes need one each")
    return TokenArrays(store, "memmap"), np.array(songs)


def step_times(config_of, lanes: int, store: TokenStore, rounds: int) -> dict[str, list[float]]:  # noqa: ANN001
    """Step times of each memory mode, round by round, on real pieces (one per lane) of which each lane has seen
    2,048 tokens.

    Each timed step starts from the same memories (restored untimed, with the previous segment's keys still to be
    stored, as in training), since a kNN memory grows with every step and its search with it. In each round the
    modes take one step each, so that load from elsewhere on the machine hits them alike.
    """
    keep_freed_memory()  # as the trainer does on CPU
    context = config_of("none").context  # the modes differ in memory only
    data, songs = pieces_for_steps(store, lanes, context)
    *warmup, last, timed = [data.gather(songs, np.full(len(songs), i * context), context + 1)
                            for i in range(MEMORY_TOKENS // context + 1)]
    same_song = torch.zeros(lanes, dtype=torch.bool)
    steps, restores = {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        model = MusicTransformer(config_of(mode)).train()
        memory = MemoryState(model.config, lanes, torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch, model=model, memory=memory, optimizer=optimizer):  # noqa: ANN001, ANN202
            tokens, features, targets = model_inputs(batch, model.config.embeddings)
            output = memory.forward(model, tokens, features, targets=targets, new_song=same_song)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return output.present

        for batch in warmup:
            step(batch)
        before_last = memory.state_dict()
        present = step(last)

        def restore(memory=memory, state=before_last, present=present) -> None:  # noqa: ANN001
            memory.load_state_dict(state)
            memory.remember(present, last["tokens"][:, :-1] != 0)

        steps[mode] = functools.partial(step, timed)
        restores[mode] = restore
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode, step in steps.items():
            restores[mode]()
            times[mode].append(median_seconds(step, repeats=1, warmup=0))
    return times


def step_cost(store: TokenStore, rounds: int) -> str:
    setups = (
        ("the quality runs' model (4×128, context 128)", model_config, LANES),
        ("the `small` preset (4×192, context 256)",
         lambda mode: ModelConfig.preset("small", TOKENIZER, memory=mode), 16),
    )
    rows = []
    for label, config_of, lanes in setups:
        times = step_times(config_of, lanes, store, rounds)
        for mode in MODES:
            # the ratio of steps taken side by side, round by round: the machine's speed drifts between rounds
            ratio = statistics.median(t / base for t, base in zip(times[mode], times["none"]))
            goal = COST_GOALS.get(mode)
            verdict = f"≤ {goal}×: {'met' if ratio <= goal else 'NOT met'}" if goal else ""
            rows.append(f"| {label}, {lanes} lanes | {mode} | {statistics.median(times[mode]) * 1000:.0f} ms | "
                        f"{ratio:.2f}× | {verdict} |")
    return ("Step time on CPU (forward, backward, AdamW; faiss kNN search) on the quality runs' long pieces, one per "
            f"lane, each lane having seen its first {MEMORY_TOKENS:,} tokens at every timed step (memories restored "
            f"before each). {rounds} rounds of one step of each mode: the median step, and the median over the "
            "rounds of the step's ratio to the step of `none` in the same round.\n\n"
            "| model | mode | step | relative to none | goal |\n|---|---|---|---|---|\n" + "\n".join(rows))


SEARCH_ENTRIES = (8192, 32768, 65536, 131072, 262144)


def search_cost(sizes: tuple[int, ...]) -> str:
    config = model_config("knn")
    rows = []
    for entries in sizes:
        cells = []
        for backend in ("faiss", "torch"):
            memory = KnnMemory(LANES, config.n_heads, config.head_dim, entries, config.knn_top_k,
                               torch.device("cpu"), backend)
            chunk = 4096
            for _ in range(entries // chunk):
                keys = torch.nn.functional.normalize(torch.randn(LANES, config.n_heads, chunk, config.head_dim), dim=-1)
                memory.write(keys, torch.randn_like(keys), torch.ones(LANES, chunk, dtype=torch.bool))
            queries = torch.nn.functional.normalize(torch.randn(LANES, config.n_heads, CONTEXT, config.head_dim), dim=-1)
            cells.append(f"{median_seconds(lambda: memory.search(queries), repeats=3) * 1000:.0f} ms")
        rows.append(f"| {entries:,} | " + " | ".join(cells) + " |")
    return (f"One search per step: {LANES} lanes × {config.n_heads} heads × {CONTEXT} queries, top-{config.knn_top_k}, "
            f"exact inner product, CPU. Both: batched matrix products for the scores; faiss: its heaps keep the top "
            f"k (the CPU path); torch: `topk` (the GPU path).\n\n"
            "| entries per lane | faiss | torch |\n|---|---|---|\n" + "\n".join(rows))


SEARCH_SAMPLE_STEPS = 6000  # the quality runs' batches over which the search is timed


def lane_sizes_in_training(store: TokenStore, steps: int, every: int) -> list[np.ndarray]:
    """Entries per lane in the kNN memory at every `every`-th step of the quality runs' batches (seed 0): the
    tokens of each lane's piece before its XL window, up to the memory's capacity."""
    capacity = model_config("knn").knn_capacity
    lanes = SongLanes(TokenArrays(store, "memmap"), store.split_indices("train"), CONTEXT, LANES, seed=0)
    offsets = [next(lanes)["offset"].numpy() for _ in range(steps)]
    return [np.clip(offset - CONTEXT, 0, capacity) for offset in offsets[::every]]


def training_search_cost(store: TokenStore, sample_steps: int) -> str:
    """Search time per step as the quality runs meet it: lanes deep in long pieces next to lanes early in short ones."""
    keep_freed_memory()  # as the trainer does on CPU: the score blocks are not mapped afresh at every search
    config = model_config("knn")
    samples = lane_sizes_in_training(store, steps=sample_steps, every=150)
    deepest = int(max(sizes.max() for sizes in samples))
    keys = torch.nn.functional.normalize(torch.randn(LANES, config.n_heads, deepest, config.head_dim), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(LANES, config.n_heads, CONTEXT, config.head_dim), dim=-1)
    memory = KnnMemory(LANES, config.n_heads, config.head_dim, config.knn_capacity, config.knn_top_k,
                       torch.device("cpu"), "faiss")
    everyone = torch.ones(LANES, dtype=torch.bool)
    own_end, fullest_end = [], []
    for sizes in samples:
        for lane_sizes, times in ((sizes, own_end), (np.full(LANES, sizes.max()), fullest_end)):
            memory.clear(everyone)
            length = int(lane_sizes.max())
            valid = torch.arange(length) < torch.from_numpy(lane_sizes).view(-1, 1)  # (B, T)
            memory.write(keys[:, :, :length], keys[:, :, :length], valid)
            times.append(median_seconds(lambda: memory.search(queries), repeats=3) if length else 0.0)
    entries = np.array(samples)
    return (f"Search time per step in training (faiss) at {len(samples)} steps spread over the first "
            f"{sample_steps:,} of the quality runs' batches (seed 0's): the lanes hold {entries.mean():,.0f} "
            f"entries on average, the fullest lane of a step {entries.max(1).mean():,.0f}. Searching each lane only "
            f"as deep as it is full takes **{1000 * np.mean(own_end):.0f} ms** a step; searching every lane as deep as "
            f"the fullest one (as the search did before 2026-12-01) takes {1000 * np.mean(fullest_end):.0f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, help="training steps per run (default 12000)")
    parser.add_argument("--seeds", type=int, help="training runs per mode, each with its own seed (default 3)")
    parser.add_argument("--only", choices=("cost", "quality"), help="run one of the two measurements")
    parser.add_argument("--jobs", type=int, help="quality runs trained side by side, the cores shared (default 2)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="depth of the quality runs' model")
    parser.add_argument("--reuse-unkeyed", action="store_true",
                        help="also reuse finished runs from before the bench recorded what a run was trained from "
                             "(the section lists them, with the known defects of their time)")
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (2 rounds, small searches; 30 steps, 1 seed, 1 job unless "
                             f"given), writing to .bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    args = parser.parse_args()
    steps = args.steps or (30 if args.quick else 12000)
    seeds = args.seeds or (1 if args.quick else 3)
    jobs = args.jobs or (1 if args.quick else 2)
    root = CACHE / "memory"
    root.mkdir(parents=True, exist_ok=True)
    if args.only != "quality":
        store = long_piece_store(root)
        quick = (2, SEARCH_ENTRIES[:2], 600)
        rounds, sizes, sample_steps = quick if args.quick else (STEP_ROUNDS, SEARCH_ENTRIES, SEARCH_SAMPLE_STEPS)
        write_section("Memory: cost", step_cost(store, rounds) + "\n\n" + search_cost(sizes) + "\n\n"
                      + training_search_cost(store, sample_steps), quick=args.quick)
    if args.only != "cost":
        depth = "" if args.layers == LAYERS else f", {args.layers} layers"
        write_section(f"Memory: quality on long pieces{depth}, {steps:,} steps a run",
                      quality(root, steps, seeds, args.layers, jobs, args.reuse_unkeyed), quick=args.quick)


if __name__ == "__main__":
    main()
