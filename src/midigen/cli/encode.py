"""`midigen encode INPUT... -o STORE`: MIDI files and folders → a token store."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode MIDI files into a token store",
        description=(
            "Encode MIDI files (folders are searched recursively for .mid/.midi) into a token store that a "
            "trainer memory-maps. Rerunning the same command after an interruption finishes the store. "
            "Bad files are skipped and listed in STORE/report.json."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="MIDI files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="STORE", help="token store folder")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per file (default 120)")
    parser.add_argument("--steps-per-quarter", type=int, default=8, help="grid resolution (default 8)")
    parser.add_argument("--max-duration", type=int, default=256, help="longest duration token, in steps")
    parser.add_argument("--keep-drums", action="store_true", help="keep drum tracks (dropped by default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.codec import TokenizerConfig
    from midigen.data.encode import encode_files

    config = TokenizerConfig(
        steps_per_quarter=args.steps_per_quarter, max_duration=args.max_duration, keep_drums=args.keep_drums
    )
    result = encode_files(
        args.inputs, args.output, config, workers=args.workers, timeout_s=args.timeout, progress=not args.quiet
    )
    for path, reason in result.skipped_now:
        print(f"skipped {path}: {reason}")
    report = result.report
    print(
        f"{args.output}: {report['encoded']} songs, {report['tokens']} tokens "
        f"({result.new_songs} new, {result.already_done} already done, {report['skipped_count']} skipped in all)"
    )
    return 0 if report["encoded"] > 0 else 1
