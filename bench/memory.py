"""Does memory help, and what does it cost? `none` vs `xl` vs `knn` on long pieces.

Quality: the bundled Beethoven string quartets and Palestrina works, keeping only pieces at least
4× longer than the context. The same model size, data stream (contiguous song batching with the
same seed for all three, so every mode sees the same tokens in the same order) and number of
steps for `none`, `xl` and `knn`; then validation NLL over every token of the long validation
pieces, also by position inside the context window and inside the piece. Each mode is trained
with several seeds (a seed sets the initial weights and the order of the batches), since a single
run's validation NLL also moves with its seed.

Cost: CPU step time of `xl` and `knn` relative to `none` (same model, same batch, memories full),
and kNN search time per step against the number of entries per lane.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shutil
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import CACHE, corpus_files, median_seconds, write_section

from midigen.codec import TokenizerConfig
from midigen.data.batching import SongLanes, TokenArrays
from midigen.data.encode import encode_files
from midigen.data.store import TokenStore
from midigen.evaluation.nll import score_songs
from midigen.model import ModelConfig, MusicTransformer
from midigen.model.memory import KnnMemory, MemoryState
from midigen.training.config import TrainConfig
from midigen.training.host_memory import keep_freed_memory
from midigen.inference.model_files import load_model
from midigen.training.recipe import train

CORPORA = ("beethoven-quartets", "palestrina")
CONTEXT = 128
LANES = 8
LAYERS = 4  # the quality runs' depth unless --layers says otherwise
MODES = ("none", "xl", "knn")
RETRIEVAL_OFF = "knn, retrieval off"  # the knn model scored without what its search finds
WINDOW_BUCKETS = ((0, 16), (16, 64), (64, CONTEXT))
PIECE_BUCKETS = ((0, 4 * CONTEXT), (4 * CONTEXT, 16 * CONTEXT), (16 * CONTEXT, 10**9))


def model_config(memory: str, layers: int = LAYERS) -> ModelConfig:
    # 128 wide; the kNN layer is the one below the top, near the output as in Memorizing Transformers
    return ModelConfig.preset("small", TokenizerConfig(), d_model=128, n_layers=layers, n_heads=4, context=CONTEXT,
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
    encode_files(files, survey)
    long_paths = [s.path for s in TokenStore(survey).songs if s.length >= 4 * CONTEXT]
    encode_files(long_paths, store_dir)
    shutil.rmtree(survey)
    return TokenStore(store_dir)


def nll_by_position(run: Path, store: TokenStore, retrieval: bool = True) -> dict[str, float]:
    trained = load_model(run, "cpu")
    if not retrieval:  # the kNN model's own network: its gate shut, the kNN layer attends only locally
        trained.model.blocks[trained.model_config.knn_layer_index].attn.gate.data.fill_(-1e4)
    data = TokenArrays(store, "memmap")
    songs = store.split_indices("val")
    songs_of = {corpus: [i for i in songs if Path(store.songs[i].path).parent.name == corpus] for corpus in CORPORA}
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
        for name, mask in groups.items():
            total = totals.setdefault(name, [0.0, 0])
            total[0] += float(values[mask].sum())
            total[1] += int(mask.sum())
    return {name: s / n for name, (s, n) in totals.items() if n}


def training_minutes(run: Path) -> float:
    """Wall time of the training run, from the last line its trainer logged."""
    last = (run / "metrics.jsonl").read_text().strip().splitlines()[-1]
    return json.loads(last)["elapsed_s"] / 60


def run_folder(root: Path, mode: str, steps: int, seed: int, layers: int) -> Path:
    parent = root if layers == LAYERS else root / f"{layers}-layers"
    return parent / (f"run-{mode}-{steps}" if seed == 0 else f"run-{mode}-{steps}-seed{seed}")


def finished(run: Path, steps: int) -> bool:
    return (run / "checkpoint.pt").exists() and load_model(run).step >= steps


def train_run(store_root: Path, run: Path, model: ModelConfig, steps: int, seed: int) -> None:
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig(max_steps=steps, batch_size=LANES, batching="contiguous", eval_interval=steps,
                         warmup_steps=100, device="cpu", seed=seed)
    train(store_root, run, model, config)


def share_cores(threads: int) -> None:
    import faiss  # here, not at the top: midigen.model.memory imports it after torch, as it must be

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def train_missing_runs(root: Path, store: TokenStore, steps: int, seeds: int, layers: int, jobs: int) -> None:
    """Train every mode and seed not finished yet, `jobs` runs at a time on a share of the cores each.

    Small models use two cores poorly: two single-threaded runs side by side finish 13% sooner than one after
    the other on two threads (150-step knn runs, 2 cores), though each run's own training minutes are longer."""
    # seed by seed, so that an interrupted bench can still score the first seeds; the slowest mode (knn) first
    missing = [(mode, seed, run_folder(root, mode, steps, seed, layers))
               for seed in range(seeds) for mode in reversed(MODES)]
    missing = [(mode, seed, run) for mode, seed, run in missing if not finished(run, steps)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawned, not forked: a fork of a process whose OpenMP threads have run can hang
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), share_cores, (threads,)) as pool:
        runs = [pool.submit(train_run, store.root, run, model_config(mode, layers), steps, seed)
                for mode, seed, run in missing]
        for done in runs:
            done.result()


def quality(root: Path, steps: int, seeds: int, layers: int, jobs: int) -> str:
    store = long_piece_store(root)
    train_missing_runs(root, store, steps, seeds, layers, jobs)
    lengths = [s.length for s in store.songs]
    val_corpora = Counter(Path(store.songs[i].path).parent.name for i in store.split_indices("val"))
    scores: dict[str, list[dict[str, float]]] = {}  # per mode, one table row per seed
    minutes: dict[str, list[float]] = {}
    for mode in MODES:
        runs = [run_folder(root, mode, steps, seed, layers) for seed in range(seeds)]
        minutes[mode] = [training_minutes(run) for run in runs]
        scores[mode] = [nll_by_position(run, store) for run in runs]
        if mode == "knn":
            scores[RETRIEVAL_OFF] = [nll_by_position(run, store, retrieval=False) for run in runs]
    names = list(scores["none"][0])
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
    knn_gains = sum(k["all"] <= 0.97 * n["all"] for n, _, k in per_seed)
    spread = max(max(r["all"] for r in scores[m]) / min(r["all"] for r in scores[m]) - 1 for m in MODES)
    verdict = (f"Ordered knn ≤ xl < none (means over seeds): **{'yes' if knn <= xl < none else 'no'}**, "
               f"and with {ordered} of {seeds} seeds; NLL change against none: xl **{100 * (xl - none) / none:+.1f}%**, "
               f"knn **{100 * (knn - none) / none:+.1f}%** (goal: knn at most -3.0%; so with {knn_gains} of {seeds} "
               f"seeds). The same mode trained with "
               f"another seed moved by up to {100 * spread:.1f}%.")
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
        + "\n".join(rows) + "\n\n" + verdict
    )


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
            tokens = batch["tokens"]
            output = memory.forward(model, tokens[:, :-1], batch["bars"][:, :-1], batch["beats"][:, :-1],
                                    targets=tokens[:, 1:], new_song=same_song)
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


def step_cost(store: TokenStore) -> str:
    setups = (
        ("the quality runs' model (4×128, context 128)", model_config, LANES),
        ("the `small` preset (4×192, context 256)",
         lambda mode: ModelConfig.preset("small", TokenizerConfig(), memory=mode), 16),
    )
    rows = []
    for label, config_of, lanes in setups:
        times = step_times(config_of, lanes, store, STEP_ROUNDS)
        for mode in MODES:
            # the ratio of steps taken side by side, round by round: the machine's speed drifts between rounds
            ratio = statistics.median(t / base for t, base in zip(times[mode], times["none"]))
            goal = COST_GOALS.get(mode)
            verdict = f"≤ {goal}×: {'met' if ratio <= goal else 'NOT met'}" if goal else ""
            rows.append(f"| {label}, {lanes} lanes | {mode} | {statistics.median(times[mode]) * 1000:.0f} ms | "
                        f"{ratio:.2f}× | {verdict} |")
    return ("Step time on CPU (forward, backward, AdamW; faiss kNN search) on the quality runs' long pieces, one per "
            f"lane, each lane having seen its first {MEMORY_TOKENS:,} tokens at every timed step (memories restored "
            f"before each). {STEP_ROUNDS} rounds of one step of each mode: the median step, and the median over the "
            "rounds of the step's ratio to the step of `none` in the same round.\n\n"
            "| model | mode | step | relative to none | goal |\n|---|---|---|---|---|\n" + "\n".join(rows))


def search_cost() -> str:
    config = model_config("knn")
    rows = []
    for entries in (8192, 32768, 65536, 131072, 262144):
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


def training_search_cost(store: TokenStore) -> str:
    """Search time per step as the quality runs meet it: lanes deep in long pieces next to lanes early in short ones."""
    keep_freed_memory()  # as the trainer does on CPU: the score blocks are not mapped afresh at every search
    config = model_config("knn")
    samples = lane_sizes_in_training(store, steps=SEARCH_SAMPLE_STEPS, every=150)
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
            f"{SEARCH_SAMPLE_STEPS:,} of the quality runs' batches (seed 0's): the lanes hold {entries.mean():,.0f} "
            f"entries on average, the fullest lane of a step {entries.max(1).mean():,.0f}. Searching each lane only "
            f"as deep as it is full takes **{1000 * np.mean(own_end):.0f} ms** a step; searching every lane as deep as "
            f"the fullest one (as the search did before 2026-12-01) takes {1000 * np.mean(fullest_end):.0f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12000, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per mode, each with its own seed")
    parser.add_argument("--only", choices=("cost", "quality"), help="run one of the two measurements")
    parser.add_argument("--jobs", type=int, default=2, help="quality runs trained side by side, the cores shared")
    parser.add_argument("--layers", type=int, default=LAYERS, help="depth of the quality runs' model")
    args = parser.parse_args()
    root = CACHE / "memory"
    root.mkdir(parents=True, exist_ok=True)
    if args.only != "quality":
        store = long_piece_store(root)
        write_section("Memory: cost", step_cost(store) + "\n\n" + search_cost() + "\n\n" + training_search_cost(store))
    if args.only != "cost":
        depth = "" if args.layers == LAYERS else f", {args.layers} layers"
        write_section(f"Memory: quality on long pieces{depth}, {args.steps:,} steps a run",
                      quality(root, args.steps, args.seeds, args.layers, args.jobs))


if __name__ == "__main__":
    main()
