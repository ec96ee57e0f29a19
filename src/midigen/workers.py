"""What the two worker pools (MIDI encoding, corpus export) share."""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from typing import Any

from tqdm import tqdm


class ForkSafeProgress(tqdm):
    monitor_interval = 0  # no monitor thread: workers are forked while the bar runs


def process_context() -> Any:
    # fork starts a worker in milliseconds; elsewhere spawn is the only safe choice
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def death_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words: "SIGSEGV", "exit code 1"."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"
