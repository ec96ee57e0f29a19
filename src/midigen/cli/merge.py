"""`midigen merge STORE... -o STORE`: join token stores, e.g. the shards of an encode."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="join token stores (the shards of `encode --shard`) into one",
        description=(
            "Join token stores of one tokenizer config into a new store. The shards of one encode "
            "(`midigen encode ... --shard I/N`, e.g. from a SLURM job array) are joined in shard order, so the "
            "result equals one encode of all the files; songs whose content is already in the merged store are "
            "dropped and reported as duplicates."
        ),
    )
    parser.add_argument("stores", nargs="+", metavar="STORE", help="token stores to join")
    parser.add_argument("-o", "--output", required=True, metavar="STORE", help="new store folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.data.merge import merge_stores

    summary = merge_stores(args.stores, args.output, progress=not args.quiet)
    for path, original in summary.duplicates:
        print(f"duplicate dropped: {path} (same content as {original})")
    print(f"{args.output}: {summary.songs} songs, {summary.report['tokens']} tokens from {len(args.stores)} stores "
          f"({len(summary.duplicates)} duplicates dropped)")
    return 0
