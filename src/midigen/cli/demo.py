"""`midigen demo`: the main job on the bundled Bach chorales."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="export, encode, train, evaluate, generate, render and measure on the Bach chorales",
        description=(
            "The whole pipeline on the Bach chorales bundled with music21: about 15 minutes on a 2-core CPU, "
            "faster on a GPU. Rerun it to reuse what is done; an interrupted training resumes."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.demo import DemoConfig, run_demo, summary

    report = run_demo(DemoConfig(out_dir=args.out, minutes=args.minutes, max_steps=args.max_steps, device=args.device))
    print(summary(report))
    return 0
