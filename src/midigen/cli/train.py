"""`midigen train STORE -o RUN`: train a model on a token store."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from midigen.model.config import MEMORY_MODES, MERGED_NOTES, PRESETS
from midigen.training.config import BATCHING_MODES, DATA_LOCATIONS, TrainConfig

DEFAULT_MAX_STEPS = 2000  # the budget of a new run given neither --max-steps nor --max-minutes
DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
# option → TrainConfig field; options left out take the field's default
TRAIN_OPTIONS = {"batch_size": "batch_size", "accumulate": "accumulate", "lr": "learning_rate",
                 "warmup_steps": "warmup_steps", "eval_interval": "eval_interval", "batching": "batching",
                 "data_location": "data_location", "transpose": "max_transpose", "device": "device", "seed": "seed"}
MODEL_OPTIONS = ("preset", "context", "memory")

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a token store",
        description=(
            "Train a music transformer on a token store made by `midigen encode`. Checkpoints, metrics.jsonl, "
            "a loss curve and TensorBoard events (`tensorboard --logdir runs/`) go to RUN. Ctrl-C stops after the "
            "current step and writes a checkpoint; --resume goes on exactly where it stopped, with the run's "
            "settings and budget (a budget given with --resume replaces the run's). Runs under torchrun for "
            "several processes (DDP)."
        ),
    )
    parser.add_argument("store", help="token store folder")
    parser.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model size (default small)")
    parser.add_argument("--context", type=int, help="tokens per training window (default: the preset's)")
    parser.add_argument("--memory", choices=MEMORY_MODES, help="long-term memory (default none)")
    parser.add_argument("--max-steps", type=int,
                        help=f"training steps of the run (default {DEFAULT_MAX_STEPS} when no --max-minutes is given)")
    parser.add_argument("--max-minutes", type=float,
                        help="training time of the run, over all its invocations; with --max-steps, whichever "
                             "runs out first ends the run")
    parser.add_argument("--batch-size", type=int,
                        help=f"sequences per batch, on each process (default {DEFAULTS['batch_size']})")
    parser.add_argument("--accumulate", type=int, metavar="K",
                        help="batches per step on each process (gradient accumulation): a step takes batch size × "
                             "K × processes sequences, so fewer devices keep the global batch by accumulating more "
                             f"(default {DEFAULTS['accumulate']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['learning_rate']:g})")
    parser.add_argument("--warmup-steps", type=int, help=f"default {DEFAULTS['warmup_steps']}")
    parser.add_argument("--eval-interval", type=int,
                        help=f"steps between validations (default {DEFAULTS['eval_interval']})")
    parser.add_argument("--batching", choices=BATCHING_MODES,
                        help="random chunks, or songs in order per lane: staggered lanes never idle and start "
                             "out of step, which learns faster than contiguous (default auto: random without "
                             "memory, staggered with it)")
    parser.add_argument("--data-location", choices=DATA_LOCATIONS,
                        help="token store on the gpu, in cpu memory or memmap from disk; kNN memory on the gpu or in "
                             "cpu memory (default auto: the fastest place each fits)")
    parser.add_argument("--transpose", type=int,
                        help=f"random transposition range in semitones (default {DEFAULTS['max_transpose']})")
    parser.add_argument("--device", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--pitch-features", action="store_true",
                        help="also embed each note's pitch class and octave, which the model derives from its token")
    parser.add_argument("--merged-notes", choices=MERGED_NOTES,
                        help="with --pitch-features on a store with merges: a merged token takes the sum of the pitch "
                             "class and octave embeddings of all its notes, or its first note's (default sum)")
    parser.add_argument("--factorised-output", action="store_true",
                        help="predict a note as its pitch class, then its octave, instead of as one of 128 pitches")
    parser.add_argument("--seed", type=int, help=f"default {DEFAULTS['seed']}")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.data.store import open_finished_store

    store = open_finished_store(args.store)  # before the heavy imports below: a bad store is refused at once

    from midigen.model.config import ModelConfig
    from midigen.training.recipe import train

    given = {option: getattr(args, option) for option in (*TRAIN_OPTIONS, *MODEL_OPTIONS)
             if getattr(args, option) is not None} | ({"compile": True} if args.compile else {}) | (
                 {"pitch_features": True} if args.pitch_features else {}) | (
                 {"merged_notes": args.merged_notes} if args.merged_notes else {}) | (
                 {"factorised_output": True} if args.factorised_output else {})
    budget = {"max_steps": args.max_steps, "max_minutes": args.max_minutes}
    if args.resume:
        if given:
            log.warning("%s: a resumed run keeps its settings; ignoring %s", args.output,
                        ", ".join("--" + option.replace("_", "-") for option in given))
        train_config = None if budget == {"max_steps": None, "max_minutes": None} else TrainConfig(**budget)
        model_config = None
    else:
        if budget == {"max_steps": None, "max_minutes": None}:
            budget["max_steps"] = DEFAULT_MAX_STEPS
        train_config = TrainConfig(**{TRAIN_OPTIONS[option]: value for option, value in given.items()
                                      if option in TRAIN_OPTIONS}, compile=args.compile, **budget)
        overrides = {name: given[name] for name in ("memory", "context", "merged_notes", "factorised_output")
                     if name in given}
        model_config = ModelConfig.preset(args.preset or "small", store.config, derived_features=args.pitch_features,
                                          **overrides)
    result, trainer = train(args.store, args.output, model_config, train_config, resume=args.resume,
                            progress=not args.quiet)
    if trainer.dist.is_main:
        val = result.val.get("val_loss")
        state = "interrupted" if result.interrupted else f"stopped ({result.stopped_by})"
        print(f"{args.output}: {state} at step {result.step}; val loss {val:.4f}" if val is not None else
              f"{args.output}: {state} at step {result.step}")
        if result.interrupted:
            print(f"checkpoint written; continue with: midigen train {args.store} -o {args.output} --resume")
    return 130 if result.interrupted else 0
