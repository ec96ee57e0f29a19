"""`midigen metrics GEN [--reference REF]`: objective musical metrics of pieces, and of a set against another."""

from __future__ import annotations

import argparse
from typing import Any

from midigen.evaluation.metrics import DEFAULT_WINDOW


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "metrics",
        help="objective musical metrics of MIDI files, compared with a reference set",
        description=(
            "Per piece: pitch range, pitches and pitch classes used, pitch-class entropy, scale consistency, "
            "polyphony, empty-beat rate, groove consistency, note density, mean inter-onset interval, "
            "repetition and back-to-back loops (definitions: `python -m pydoc midigen.evaluation.metrics`). "
            "With --reference, for each metric the overlap area and KL divergence (Yang & Lerch 2018) of the "
            "kernel density estimates of the two sets' per-piece values. Folders are searched recursively; "
            "unreadable files are skipped and listed. For each file with `midigen generate`'s continuation "
            "marker, the far quotes: how many of the continuation's tokens end 16 tokens last seen in the prompt "
            "more than --window tokens before (in the tokens of --model, and beyond what it attends to, when "
            "given). Exits 2 when no file could be measured."
        ),
    )
    parser.add_argument("generated", nargs="+", metavar="GEN", help="MIDI files or folders")
    parser.add_argument("--reference", nargs="+", metavar="REF", help="MIDI files or folders to compare with")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument("--png", metavar="OUT", help="plot the distribution of each metric to this PNG")
    parser.add_argument(
        "--continuation-only", action="store_true",
        help="measure only what `midigen generate` wrote after the prompt (from its marker on)",
    )  # fmt: skip
    parser.add_argument(
        "--model", metavar="RUN",
        help="the run or model folder that generated the files: far quotes are counted in its tokens, beyond its "
             "context plus XL memory",
    )  # fmt: skip
    parser.add_argument(
        "--window", type=int, metavar="TOKENS",
        help="the model's context plus XL memory, in tokens: quotes from further back count as far quotes "
             f"(default: that of --model, else {DEFAULT_WINDOW}: 256 + 256, the small and base presets with XL "
             "memory, in the default tokenizer's tokens)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from midigen.evaluation.metrics import compare_sets, measure_set
    from midigen.evaluation.plots import plot_metric_distributions
    from midigen.io_utils import atomic_write_text

    from midigen.inference.model_files import model_folder, read_config

    progress = not args.quiet
    window, tokenizer_config = DEFAULT_WINDOW, None
    if args.model:
        config = read_config(model_folder(args.model))
        window, tokenizer_config = config["model"].reach, config["tokenizer"]
    window = args.window if args.window is not None else window
    if args.reference:
        result = compare_sets(args.generated, args.reference, args.continuation_only, progress, window,
                              tokenizer_config)
        sets = {"generated": result["generated"], "reference": result["reference"]}
    else:
        result = measure_set(args.generated, args.continuation_only, progress, window, tokenizer_config)
        sets = {"generated": result}
    for measured in sets.values():
        for reason in measured["skipped"]:
            print(f"skipped {reason}")
    print_report(sets, result.get("comparison"))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.png:
        plot_metric_distributions(result, args.png)
    return 0


def print_report(sets: dict[str, dict[str, Any]], comparison: dict[str, Any] | None) -> None:
    from midigen.evaluation.metrics import METRICS

    generated = sets["generated"]
    if len(sets) == 1 and len(generated["pieces"]) == 1:
        ((path, metrics),) = generated["pieces"].items()
        print(path)
        for name, value in metrics.items():
            print(f"  {name:<22} {format_value(value)}")
        return
    header = f"{'metric':<22}" + "".join(f"{name + ' mean ± std':>26}" for name in sets)
    print(header + (f"{'overlap':>9}{'KL':>8}" if comparison else ""))
    for metric in METRICS:
        line = f"{metric:<22}" + "".join(f"{format_spread(s['summary'][metric]):>26}" for s in sets.values())
        scores = comparison.get(metric) if comparison else None
        if scores:
            line += f"{scores['overlap_area']:>9.3f}{scores['kl_divergence']:>8.3f}"
        print(line)
    for name, measured in sets.items():
        print(f"{name}: {len(measured['pieces'])} pieces, {len(measured['skipped'])} skipped, "
              f"{len(measured['degenerate_loops'])} with a degenerate loop")
        for path in measured["degenerate_loops"]:
            print(f"  degenerate loop: {path}")
        for path, metrics in measured["pieces"].items():
            if "far_quotes" in metrics:
                print(f"  far quotes: {metrics['far_quotes']} of {metrics['continuation_tokens']} continuation "
                      f"tokens ({format_value(metrics['far_quote_share'])}): {path}")


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def format_spread(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return "n/a"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"
