"""`midigen export RUN -o MODEL_DIR`: a model folder to share (weights, config, model card)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a shareable model folder from a run",
        description=(
            "Write MODEL_DIR with model.safetensors, config.json (model, tokenizer, and where the weights come "
            "from: store identity, steps, tokens seen, validation NLL, midigen version) and README.md (a model "
            "card with a licence line to fill in): the layout of a Hugging Face model repository. Every command "
            "that takes a RUN also takes a MODEL_DIR; loading one executes nothing."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="run folder (or model folder)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="new folder to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.inference.export import export_model

    folder = export_model(args.run_dir, args.output)
    print(f"{folder}: model folder written (config.json, model.safetensors, README.md); fill in its licence line")
    return 0
