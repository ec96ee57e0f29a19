"""Velocity as tokens: what it costs in tokens and in NLL per note.

The multi-track codec writes a velocity token after a note whose velocity bin differs from its instrument's last
one. On real expressive files (the piano pieces of ../shared/midi/piano, with the test prompts and multi-track
files), two stores are encoded, with instruments and drums, without velocities and with 8 bins; on each, the
`small` preset trains for the same steps with the same seeds, and `midigen eval` scores the validation split.
NLL per note (nats summed over all tokens, per note) is comparable across the two encodings; the difference is
what predicting the velocities costs, per note.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import ROOT, write_section

from midigen.codec import TokenizerConfig
from midigen.data.encode import encode_files
from midigen.data.store import TokenStore
from midigen.evaluation.nll import evaluate_split
from midigen.inference import load_model
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.recipe import train

SOURCES = (ROOT.parent / "shared" / "midi" / "piano", ROOT / "tests" / "data" / "prompts", ROOT / "tests" / "data" / "multitrack")
ENCODINGS = {"no velocities": TokenizerConfig(velocity_bins=0), "8 velocity bins (default)": TokenizerConfig()}


def measure(config: TokenizerConfig, steps: int, seeds: int, folder: Path) -> dict[str, object]:
    store_dir = folder / f"store-{config.velocity_bins}"
    encode_files([str(s) for s in SOURCES if s.exists()], store_dir, config, workers=2, progress=False)
    store = TokenStore(store_dir)
    notes = sum(song.notes for song in store.songs)  # as read, before the merge of unisons
    runs = []
    for seed in range(seeds):
        run = folder / f"run-{config.velocity_bins}-{seed}"
        train(store_dir, run, ModelConfig.preset("small", config),
              TrainConfig(max_steps=steps, batch_size=16, eval_interval=steps, seed=seed, device="cpu",
                          batching="random"), progress=False)
        runs.append(evaluate_split(load_model(run, "cpu").model, store, "val"))
    return {"tokens_per_note": store.num_tokens / notes, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="check that the bench runs (20 steps, one seed)")
    args = parser.parse_args()
    steps, seeds = (20, 1) if args.quick else (args.steps, args.seeds)
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: measure(config, steps, seeds, Path(scratch)) for name, config in ENCODINGS.items()}
    rows, per_note = [], {}
    for name, result in results.items():
        runs = result["runs"]
        per_note[name] = statistics.mean(r["nll_per_note"] for r in runs)
        rows.append(f"| {name} | {result['tokens_per_note']:.2f} | {statistics.mean(r['nll'] for r in runs):.4f} | "
                    f"{' / '.join(format(r['nll_per_note'], '.3f') for r in runs)} | {per_note[name]:.3f} | "
                    f"{statistics.mean(r['bits_per_second'] for r in runs):.1f} | {runs[0]['notes']:,} |")
    plain, with_velocity = per_note.values()
    body = (
        f"The `small` preset, {steps} steps of 16 random chunks on CPU, seeds 0-{seeds - 1}, on the expressive piano "
        "pieces of ../shared/midi/piano, the test prompts and the multi-track test files (instruments and drums "
        "kept); validation split scored by `evaluate_split` (as `midigen eval --json`).\n\n"
        "| encoding | tokens per note (whole store) | NLL per token | NLL per note by seed (nats) | mean NLL per note | "
        "bits per second | validation notes |\n|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Predicting 8 velocity bins costs {with_velocity - plain:+.3f} nats per note "
        f"({(with_velocity / plain - 1) * 100:+.1f}% of the NLL per note without them).\n"
    )
    write_section("Velocity as tokens: tokens and NLL per note", body, quick=args.quick)


if __name__ == "__main__":
    main()
