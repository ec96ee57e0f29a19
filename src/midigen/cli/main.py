"""`midigen` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from midigen import __version__
from midigen.errors import MidigenError

# Order of commands in `--help`; every other module of this package with a `register` follows.
COMMAND_ORDER = ("demo", "corpus", "encode", "merge", "tokenizer", "roundtrip", "train", "eval", "generate", "export",
                 "render", "metrics", "convert_run")


def command_modules() -> list[str]:
    """Each module `midigen.cli.<name>` that defines `register(subparsers)` adds one subcommand."""
    import midigen.cli

    names = [m.name for m in pkgutil.iter_modules(midigen.cli.__path__) if m.name not in ("main", "options")]
    return sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midigen", description="Learn music from MIDI files and write more of it."
    )
    parser.add_argument("--version", action="version", version=f"midigen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules():
        importlib.import_module(f"midigen.cli.{name}").register(subparsers)
    return parser


class ProgressAwareHandler(logging.Handler):
    """Writes each note on its own line above the progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never take the command down)
            self.handleError(record)


def configure_logging() -> None:
    """midigen's own progress notes on stderr; other libraries' loggers stay quiet."""
    logger = logging.getLogger("midigen")
    if not logger.handlers:
        handler = ProgressAwareHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return int(args.run(args) or 0)
    except MidigenError as exc:
        print(f"midigen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"midigen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
