"""`midigen corpus NAME -o DIR`: a corpus bundled with music21 → MIDI files with a train/val/test split."""

from __future__ import annotations

import argparse

from midigen.data.corpus import CORPORA, DEFAULT_TIMEOUT_S


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corpus",
        help="export a corpus bundled with music21 as MIDI files",
        description=(
            f"Export real music that ships with music21 ({', '.join(CORPORA)}) as MIDI files into DIR, one "
            "track per part with the part's instrument as its General MIDI program (percussion on the drum "
            "channel), with DIR/splits.json (train/val/test) and DIR/manifest.json (sources, failures). "
            "chamber holds the pieces for two or more different instruments: string quartets of Haydn, Mozart, "
            "Beethoven and Schumann, trios, songs, and Bach chorales with their orchestral parts. "
            "Rerunning skips pieces already exported and pieces that failed before. Pieces that cannot be "
            "exported are listed with the reason. Exits 0 when DIR holds at least one selected piece."
        ),
    )
    parser.add_argument("name", metavar="NAME", help=f"the corpus: {', '.join(CORPORA)}")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the MIDI files")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="export only the first N pieces")
    parser.add_argument(
        "--piece", action="append", metavar="PIECE", help="export only this piece (repeatable), e.g. bach_bwv269"
    )
    parser.add_argument("--retry-failed", action="store_true", help="try again the pieces that failed before")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per piece (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.data.corpus import export_corpus
    from midigen.errors import MidigenError

    report = export_corpus(
        args.name,
        args.output,
        workers=args.workers,
        limit=args.limit,
        names=args.piece,
        retry_failed=args.retry_failed,
        timeout_s=args.timeout,
        progress=not args.quiet,
    )
    for name, reason in report.failed:
        print(f"failed {name}: {reason}")
    for name, reason in report.failed_before:
        print(f"failed before, not retried {name}: {reason}")
    print(
        f"{args.output}: {len(report.exported)} exported, {len(report.cached)} already there, "
        f"{len(report.failed) + len(report.failed_before)} failed; splits in {report.splits_path}"
    )
    if not report.paths:
        raise MidigenError(f"{args.output}: no piece of {args.name} could be exported")
    return 0
