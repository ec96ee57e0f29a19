"""Options shared by several subcommands."""

from __future__ import annotations

import argparse

from midigen.codec.config import TokenizerConfig

DEFAULTS = TokenizerConfig()


def add_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps-per-quarter", type=int, default=DEFAULTS.steps_per_quarter,
                        help=f"grid resolution (default {DEFAULTS.steps_per_quarter})")
    parser.add_argument("--max-duration", type=int, default=DEFAULTS.max_duration,
                        help=f"longest duration token, in steps (default {DEFAULTS.max_duration})")
    parser.add_argument("--keep-drums", action="store_true", help="keep drum tracks (dropped by default)")
    parser.add_argument("--keep-unisons", action="store_true",
                        help="keep every note of one pitch that starts on the same step (by default the longest "
                             "stands for them all: a single instrument sounds the same)")


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(steps_per_quarter=args.steps_per_quarter, max_duration=args.max_duration,
                           keep_drums=args.keep_drums, merge_unisons=not args.keep_unisons)
