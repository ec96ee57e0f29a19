"""Which batching learns fast and keeps memory meaningful? Random chunks, contiguous lanes and staggered lanes.

The setting a new user meets first: 300 steps of the `small` preset (16 lanes of 256 tokens) on the Beethoven
string quartets, default tokenizer and training settings, CPU. Each (memory, batching) pair is trained with
each seed (the seed sets the initial weights and the batches), then scored on the whole validation split with
its memory (`evaluate_split`): NLL per token, and NLL on the recall tokens (repeats of passages beyond the
model's reach, which only the kNN memory can copy) against the other tokens. Beside them, the share of the
training rows' targets that were padding: rows a batching spent on nothing.

Runs are cached in .bench/batching/ and reused only when trained from the same midigen sources, store and
configs (the key of bench/memory.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
from common import CACHE, QUICK_BENCHMARKS, corpus_files, cpu_name, write_section
from memory import RUN_RECORD, run_key, sources_hash, training_minutes

from midigen.codec import TokenizerConfig
from midigen.data.batching import TokenArrays
from midigen.data.encode import encode_files
from midigen.data.store import TokenStore
from midigen.evaluation.nll import evaluate_split
from midigen.inference.model_files import CHECKPOINT_FILE, load_model
from midigen.io_utils import atomic_write_text
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.recipe import make_sampler, split_songs, train

CORPUS = "beethoven-quartets"
PRESET = "small"
STEPS = 300
# (memory, batching): the baseline without memory, today's batching for memory, and the staggered lanes
SETUPS = (("none", "random"), ("none", "contiguous"), ("none", "staggered"), ("knn", "contiguous"),
          ("knn", "staggered"))


def quartet_store(root: Path) -> TokenStore:
    """The quartets encoded with the default tokenizer, as `midigen encode` does."""
    store_dir = root / "store-quartets"
    if not (store_dir / "report.json").exists():
        encode_files(corpus_files(CORPUS), store_dir, TokenizerConfig(), progress=False)
    return TokenStore(store_dir)


def configs(store: TokenStore, memory: str, batching: str, steps: int, seed: int) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig.preset(PRESET, store.config, memory=memory)
    return model, TrainConfig(max_steps=steps, batching=batching, eval_interval=steps, device="cpu", seed=seed)


def padding_share(store: TokenStore, model: ModelConfig, training: TrainConfig) -> float:
    """The share of the training batches' targets that are padding, over the run's steps (the same batches)."""
    train_songs, _ = split_songs(store)
    sampler = make_sampler(TokenArrays(store, "cpu"), train_songs, model, training, 0)  # one process: shard 0
    padded = total = 0
    for _ in range(training.max_steps):
        targets = next(sampler)["tokens"][:, 1:]  # (B, T)
        padded += int((targets == 0).sum())
        total += targets.numel()
    return padded / total


def trained_run(root: Path, store: TokenStore, memory: str, batching: str, steps: int, seed: int) -> Path:
    """The run of this setup, trained now unless a finished run of the same key is there."""
    run = root / f"run-{memory}-{batching}-{steps}-seed{seed}"
    model, training = configs(store, memory, batching, steps, seed)
    sources = sources_hash()
    key = run_key(sources, store.identity(), model, training)
    record = run / RUN_RECORD
    if (run / CHECKPOINT_FILE).exists() and record.exists() and json.loads(record.read_text())["key"] == key:
        return run
    shutil.rmtree(run, ignore_errors=True)
    train(store.root, run, model, training, progress=False)
    atomic_write_text(record, json.dumps({"key": key, "sources": sources, "cpu": cpu_name(), "jobs": 1,
                                          "trained": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                                         indent=2) + "\n")
    return run


def comparison(root: Path, steps: int, seeds: int) -> str:
    store = quartet_store(root)
    rows = ["| memory | batching | validation NLL | seed by seed | recall NLL | other NLL | padding in training "
            "rows | training minutes |", "|---|---|---|---|---|---|---|---|"]
    nll: dict[tuple[str, str], float] = {}
    recall_tokens = {}
    for memory, batching in SETUPS:
        figures, minutes = [], []
        for seed in range(seeds):
            run = trained_run(root, store, memory, batching, steps, seed)
            figures.append(evaluate_split(load_model(run, "cpu").model, store, "val"))
            minutes.append(training_minutes(run))
        mean = {name: float(np.mean([f[name] for f in figures])) for name in ("nll", "recall_nll", "other_nll")}
        nll[memory, batching] = mean["nll"]
        recall_tokens[memory] = (figures[0]["recall_tokens"], figures[0]["reach"])
        padding = padding_share(store, *configs(store, memory, batching, steps, 0))
        rows.append(f"| {memory} | {batching} | {mean['nll']:.3f} | " + " / ".join(f"{f['nll']:.3f}" for f in figures)
                    + f" | {mean['recall_nll']:.3f} | {mean['other_nll']:.3f} | {100 * padding:.0f}% | "
                    f"{np.mean(minutes):.1f} |")
    baseline = nll["none", "random"]
    verdicts = [f"`{memory}` staggered against contiguous: **{nll[memory, 'staggered'] - nll[memory, 'contiguous']:+.3f}"
                f"** nats/token (staggered {nll[memory, 'staggered'] - baseline:+.3f} from none with random chunks, "
                f"contiguous {nll[memory, 'contiguous'] - baseline:+.3f})" for memory in ("none", "knn")]
    train_songs, val_songs = split_songs(store)
    reaches = "; ".join(f"{memory}: {tokens:,} tokens beyond a reach of {reach}"
                        for memory, (tokens, reach) in recall_tokens.items())
    return (
        f"{steps} steps of the `{PRESET}` preset (16 lanes × 256 tokens; knn: XL memory and the kNN memory) on the "
        f"{CORPUS} ({len(train_songs)} training pieces, {len(val_songs)} validation, "
        f"{sum(store.songs[i].length for i in train_songs):,} training tokens), default tokenizer and training "
        f"settings, CPU, one run after the other; seeds 0 to {seeds - 1}. Validation NLL (nats per token) over every "
        "token of the validation split, scored with memory (lanes play each piece from its start); recall NLL on "
        f"the recall tokens of each model's reach ({reaches}) and other NLL on the rest. Batchings: `random` "
        "chunks (memory cleared every batch); `contiguous` lanes (songs back to back, each epoch every token once: "
        "lanes that finish wait with padding for the longest song); `staggered` lanes (`StaggeredLanes`: the "
        "queue refilled at once, so no lane waits, and each lane's first song begun at a random point).\n\n"
        + "\n".join(rows) + "\n\n" + "; ".join(verdicts) + "."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {STEPS})")
    parser.add_argument("--seeds", type=int, help="runs per setup, each with its own seed (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (5 steps, 1 seed unless given), writing to "
                             f".bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else STEPS)
    seeds = args.seeds or (1 if args.quick else 2)
    root = CACHE / "batching"
    root.mkdir(parents=True, exist_ok=True)
    write_section(f"Batching: contiguous, staggered and random, {steps} steps of `{PRESET}`",
                  comparison(root, steps, seeds), quick=args.quick)


if __name__ == "__main__":
    main()
