"""`midigen roundtrip IN.mid -o OUT.mid`: encode and decode one file, to hear what the encoding keeps."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "roundtrip",
        help="encode and decode one MIDI file",
        description="Encode a MIDI file to tokens and decode it back, writing what the encoding keeps.",
    )
    parser.add_argument("input", help="MIDI file")
    parser.add_argument("-o", "--output", required=True, help="MIDI file to write")
    parser.add_argument("--steps-per-quarter", type=int, default=8, help="grid resolution (default 8)")
    parser.add_argument("--keep-drums", action="store_true", help="keep drum tracks (dropped by default)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.codec import TokenizerConfig
    from midigen.codec.roundtrip import roundtrip_file

    config = TokenizerConfig(steps_per_quarter=args.steps_per_quarter, keep_drums=args.keep_drums)
    report = roundtrip_file(args.input, args.output, config)
    print(
        f"{args.input}: {report.notes_in} notes in, {report.notes_out} out "
        f"({report.tokens} tokens; {report.merged} merged, {report.clamped} clamped); wrote {args.output}"
    )
    return 0
