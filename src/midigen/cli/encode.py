"""`midigen encode INPUT... -o STORE`: MIDI files and folders → a token store."""

from __future__ import annotations

import argparse

from midigen.cli.options import add_kind_options, add_tokenizer_options, kind_config, tokenizer_config
from midigen.cli.tokenizer import add_bpe_options, print_summary
from midigen.codec.sandbox import DEFAULT_TIMEOUT_S
from midigen.errors import MidigenError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode MIDI files into a token store",
        description=(
            "Encode MIDI files (folders are searched recursively for .mid/.midi) into a token store that a "
            "trainer memory-maps. Rerunning the same command after an interruption finishes the store. "
            "Bad files are skipped and listed in STORE/report.json. Exits 0 when the store holds at least "
            "one song, 2 when no file could be encoded. With --bpe N, the files go into STORE-base, and STORE holds "
            "them with byte-pair merges learned on its training songs (as `midigen tokenizer train`)."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="MIDI files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="STORE", help="token store folder")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds allowed per file (default {DEFAULT_TIMEOUT_S:g})"
    )
    parser.add_argument("--shard", metavar="I/N",
                        help="encode only the I-th (from 0) of N equal shares of the sorted input files, e.g. one task "
                             "of a SLURM job array; join the shards' stores with `midigen merge`")
    add_tokenizer_options(parser)
    add_kind_options(parser)
    add_bpe_options(parser, "--bpe")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.data.bpe import base_store_path, train_store
    from midigen.data.encode import Shard, encode_files

    config = kind_config(args, tokenizer_config(args))
    shard = Shard.parse(args.shard) if args.shard else None
    if args.bpe and shard is not None:
        raise MidigenError("--bpe learns merges on the whole store: merge the shards' stores, then run "
                           "`midigen tokenizer train`")
    store = base_store_path(args.output) if args.bpe else args.output
    summary = encode_files(
        args.inputs, store, config, workers=args.workers, timeout_s=args.timeout, progress=not args.quiet,
        shard=shard,
    )
    for path, reason in summary.skipped_now:
        print(f"skipped {path}: {reason}")
    report = summary.report
    print(
        f"{store}: {report['encoded']} songs, {report['tokens']} tokens "
        f"({summary.new_songs} new, {summary.already_done} already done, {report['skipped_count']} skipped in all)"
    )
    if report["encoded"] == 0:
        raise MidigenError(f"{store}: no file could be encoded ({report['files']} tried; see report.json)")
    if args.bpe:
        print_summary(train_store(store, args.output, args.bpe, split_bars=args.split_bars,
                                  max_tokens=args.max_tokens, progress=not args.quiet))
    return 0

