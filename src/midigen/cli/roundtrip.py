"""`midigen roundtrip IN.mid -o OUT.mid`: encode and decode one file, to hear what the encoding keeps."""

from __future__ import annotations

import argparse

from midigen.codec.config import TokenizerConfig
from midigen.codec.sandbox import DEFAULT_TIMEOUT_S

DEFAULTS = TokenizerConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "roundtrip",
        help="encode and decode one MIDI file",
        description=(
            "Encode a MIDI file to tokens and decode it back, writing what the encoding keeps. "
            "Exits 2 with a one-line reason on a file that cannot be encoded."
        ),
    )
    parser.add_argument("input", help="MIDI file")
    parser.add_argument("-o", "--output", required=True, help="MIDI file to write")
    parser.add_argument(
        "--steps-per-quarter",
        type=int,
        default=DEFAULTS.steps_per_quarter,
        help=f"grid resolution (default {DEFAULTS.steps_per_quarter})",
    )
    parser.add_argument(
        "--max-duration",
        type=int,
        default=DEFAULTS.max_duration,
        help=f"longest duration token, in steps (default {DEFAULTS.max_duration})",
    )
    parser.add_argument("--keep-drums", action="store_true", help="keep drum tracks (dropped by default)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds allowed to encode (default {DEFAULT_TIMEOUT_S:g})"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.codec.roundtrip import roundtrip_file

    config = TokenizerConfig(
        steps_per_quarter=args.steps_per_quarter, max_duration=args.max_duration, keep_drums=args.keep_drums
    )
    report = roundtrip_file(args.input, args.output, config, timeout_s=args.timeout)
    print(
        f"{args.input}: {report.notes_in} notes in, {report.notes_out} out "
        f"({report.tokens} tokens; {report.merged} merged, {report.clamped} clamped); wrote {args.output}"
    )
    return 0
