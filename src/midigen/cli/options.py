"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from midigen.codec.config import TOKENIZER_KINDS, TokenizerConfig
from midigen.errors import MidigenError

DEFAULTS = TokenizerConfig()


def add_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps-per-quarter", type=int, default=DEFAULTS.steps_per_quarter,
                        help=f"grid resolution (default {DEFAULTS.steps_per_quarter})")
    parser.add_argument("--max-duration", type=int, default=DEFAULTS.max_duration,
                        help=f"longest duration token, in steps (default {DEFAULTS.max_duration})")
    parser.add_argument("--single-stream", action="store_true",
                        help="the seed's original encoding: every non-drum note in one piano stream, no velocities "
                             "(by default each note keeps its instrument, drums and velocity)")
    parser.add_argument("--no-drums", action="store_true", help="drop drum tracks (kept by default)")
    parser.add_argument("--velocity-bins", type=int, default=None,
                        help=f"velocity levels kept, 0 for none (default {DEFAULTS.velocity_bins}; "
                             "0 with --single-stream)")
    parser.add_argument("--keep-unisons", action="store_true",
                        help="keep every note of one pitch that starts on the same step (by default the longest "
                             "stands for them all: a single instrument sounds the same)")


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    single = args.single_stream
    velocity_bins = args.velocity_bins if args.velocity_bins is not None else 0 if single else DEFAULTS.velocity_bins
    return TokenizerConfig(steps_per_quarter=args.steps_per_quarter, max_duration=args.max_duration,
                           instruments=not single, keep_drums=not (single or args.no_drums),
                           velocity_bins=velocity_bins, merge_unisons=not args.keep_unisons)


def add_kind_options(parser: argparse.ArgumentParser) -> None:
    """`--tokenizer NAME` and `--tokenizer-config FILE.json` (shared with `midigen roundtrip`)."""
    parser.add_argument("--tokenizer", default="seed", choices=TOKENIZER_KINDS,
                        help="the encoding: seed (default), or MidiTok's remi, tsd or midilike")
    parser.add_argument("--tokenizer-config", metavar="FILE.json",
                        help="MidiTok parameters (a JSON object) merged over midigen's defaults, e.g. "
                             '{"pitch_range": [21, 108]}; see TokenizerConfig.miditok')


def kind_config(args: argparse.Namespace, config: TokenizerConfig) -> TokenizerConfig:
    """`config` of the kind `--tokenizer` names, with the MidiTok parameters of `--tokenizer-config`."""
    params = {}
    if args.tokenizer_config:
        try:
            params = json.loads(Path(args.tokenizer_config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MidigenError(f"{args.tokenizer_config}: cannot read the tokenizer config: {exc}") from None
        if not isinstance(params, dict):
            raise MidigenError(f"{args.tokenizer_config}: expected a JSON object of MidiTok parameters")
    return replace(config, kind=args.tokenizer, miditok=params)
