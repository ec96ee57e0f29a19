"""`midigen eval RUN --data STORE`: NLL of a trained model on a split, against a bigram floor."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained model",
        description=(
            "Mean negative log-likelihood (nats per predicted token, padding excluded) of a trained model on "
            "every token of a split, by token type, and the NLL of an add-one bigram fitted on the training "
            "split and scored on the same tokens: the floor any transformer must beat. The summed NLL is also "
            "given per note (nats) and per second of music (bits), by each song's tempo map."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("--data", required=True, metavar="STORE", help="token store")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    parser.add_argument("--batch-size", type=int, default=32, help="songs scored side by side (default 32)")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from midigen.data.store import open_finished_store
    from midigen.errors import MidigenError

    if args.batch_size < 1:
        raise MidigenError(f"--batch-size must be at least 1, got {args.batch_size}")
    store = open_finished_store(args.data)  # before the heavy imports below: a bad store is refused at once

    from midigen.evaluation.nll import evaluate_split
    from midigen.inference.model_files import load_model
    from midigen.io_utils import atomic_write_text

    trained = load_model(args.run_dir, args.device)
    if store.config != trained.tokenizer:
        raise MidigenError(f"{args.data}: store was encoded with another tokenizer than the model's")
    figures = evaluate_split(trained.model, store, args.split, args.batch_size,
                             progress=True)
    by_type = ", ".join(f"{k} {v:.4f}" for k, v in figures["nll_by_type"].items() if v is not None)
    print(f"{args.split}: nll {figures['nll']:.4f} (ppl {figures['ppl']:.2f}) over {figures['tokens']} tokens; "
          f"bigram nll {figures['bigram_nll']:.4f}; by type: {by_type}")
    if figures["nll_per_note"] is not None and figures["bits_per_second"] is not None:  # None: no notes, no time
        print(f"nll per note {figures['nll_per_note']:.4f} nats over {figures['notes']} notes; "
              f"{figures['bits_per_second']:.2f} bits per second over {figures['seconds']:.1f} s of music")
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0
