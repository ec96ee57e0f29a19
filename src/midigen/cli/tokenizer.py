"""`midigen tokenizer train STORE --vocab N -o STORE2`: byte-pair merges learned on a store, applied to a new one."""

from __future__ import annotations

import argparse

from midigen.data.bpe import DEFAULT_MAX_TOKENS, BpeSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="learn byte-pair merges on a token store",
                                   description="Work on a token store's tokenizer.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="learn byte-pair merges on a store and write the store with them",
        description=(
            "Learn byte-pair merges across timesteps on the training songs of STORE (Hugging Face `tokenizers`, one "
            "character per base token, merges crossing onset groups and bars) until the vocabulary holds N tokens, "
            "then write every song of STORE with the merges applied into a new store (no MIDI is read again). The "
            "merges are saved in its tokenizer.json, so every run and model trained on it carries them. Rerunning "
            "after an interruption finishes the new store."
        ),
    )
    add_bpe_options(train, "--vocab", required=True)
    train.add_argument("store", metavar="STORE", help="token store of base tokens")
    train.add_argument("-o", "--output", required=True, metavar="STORE2", help="new store folder")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run)


def add_bpe_options(parser: argparse.ArgumentParser, flag: str, required: bool = False) -> None:
    """The vocabulary size (`flag`) and the learning options `tokenizer train` and `encode --bpe` share."""
    parser.add_argument(flag, type=int, required=required, metavar="N",
                        help="vocabulary size with the merged tokens (base tokens included)")
    parser.add_argument("--split-bars", action="store_true",
                        help="learn and apply merges inside each bar only (for comparison; default: across bars)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="T",
                        help=f"learn from at most T base tokens of training songs, spread over them (bounds the "
                             f"learner's memory; default {DEFAULT_MAX_TOKENS:,})")


def print_summary(summary: BpeSummary) -> None:
    print(f"{summary.store}: {summary.report['encoded']} songs, {summary.report['tokens']} tokens, "
          f"{summary.merges} merged tokens learned from {summary.learned_from} base tokens of training songs")


def run(args: argparse.Namespace) -> int:
    from midigen.data.bpe import train_store

    summary = train_store(args.store, args.output, args.vocab, split_bars=args.split_bars, max_tokens=args.max_tokens,
                          progress=not args.quiet)
    print_summary(summary)
    return 0
