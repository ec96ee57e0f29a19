"""`midigen roundtrip IN.mid -o OUT.mid`: encode and decode one file, to hear what the encoding keeps."""

from __future__ import annotations

import argparse

from midigen.cli.options import add_kind_options, add_tokenizer_options, kind_config, tokenizer_config
from midigen.codec.sandbox import DEFAULT_TIMEOUT_S


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
    add_tokenizer_options(parser)
    add_kind_options(parser)
    parser.add_argument("--store", metavar="STORE",
                        help="use the tokenizer of this token store (kind, config and byte-pair merges) instead of "
                             "the tokenizer options")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds allowed to encode (default {DEFAULT_TIMEOUT_S:g})"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.codec.roundtrip import roundtrip_file
    from midigen.data.store import TokenStore

    config = TokenStore(args.store).config if args.store else kind_config(args, tokenizer_config(args))
    report = roundtrip_file(args.input, args.output, config, timeout_s=args.timeout)
    print(
        f"{args.input}: {report.notes_in} notes in, {report.notes_out} out "
        f"({report.tokens} tokens; {report.merged} merged, {report.clamped} clamped); wrote {args.output}"
    )
    return 0
