"""`midigen convert-run RUN`: rewrite a run folder of an older midigen in the safe format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-run",
        help="convert a run folder of an older midigen (checkpoint.pt) to the safe format",
        description=(
            "Older midigen wrote pickled checkpoints (checkpoint.pt), which no command opens any more: a pickle "
            "can run code. This reads them with torch.load(weights_only=True), which builds only tensors and "
            "plain containers, and writes config.json and safetensors files in their place. A file it cannot "
            "read that way cannot be converted: retrain."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="run folder holding checkpoint.pt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.training.legacy import convert_legacy_run

    written = convert_legacy_run(args.run_dir)
    print(f"{args.run_dir}: converted ({', '.join(p.name for p in written)})")
    return 0
