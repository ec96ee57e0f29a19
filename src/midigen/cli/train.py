"""`midigen train STORE -o RUN`: train a model on a token store."""

from __future__ import annotations

import argparse

from midigen.model.config import MEMORY_MODES, PRESETS
from midigen.training.config import BATCHING_MODES, DATA_LOCATIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a token store",
        description=(
            "Train a music transformer on a token store made by `midigen encode`. Checkpoints, metrics.jsonl "
            "and a loss curve go to RUN. Ctrl-C stops after the current step and writes a checkpoint; "
            "--resume continues exactly where it stopped. Runs under torchrun for several processes (DDP)."
        ),
    )
    parser.add_argument("store", help="token store folder")
    parser.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (default small)")
    parser.add_argument("--context", type=int, help="tokens per training window (default: the preset's)")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="none", help="long-term memory (default none)")
    parser.add_argument("--max-steps", type=int, help="training steps (the length of the schedule)")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget of this invocation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=200, help="steps between validations")
    parser.add_argument("--batching", choices=BATCHING_MODES, default="auto",
                        help="random chunks, or songs in order per lane (default: random without memory, contiguous with it)")
    parser.add_argument("--data-location", choices=DATA_LOCATIONS, default="auto",
                        help="token store on the gpu, in cpu memory or memmap from disk; kNN memory on the gpu or in "
                             "cpu memory (default: the fastest place each fits)")
    parser.add_argument("--transpose", type=int, default=5, help="random transposition range in semitones")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.model.config import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.training.recipe import open_training_store, train

    budget = {"max_steps": args.max_steps, "max_minutes": args.max_minutes}
    if args.max_steps is None and args.max_minutes is None:
        budget["max_steps"] = 2000
    train_config = TrainConfig(
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        eval_interval=args.eval_interval,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        batching=args.batching,
        max_transpose=args.transpose,
        data_location=args.data_location,
        **budget,
    )
    model_config = None
    if not args.resume:
        overrides = {"memory": args.memory} | ({"context": args.context} if args.context else {})
        model_config = ModelConfig.preset(args.preset, open_training_store(args.store).config, **overrides)
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
