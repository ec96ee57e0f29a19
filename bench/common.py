"""Helpers shared by the benchmarks: timing, machine description, and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from midigen.io_utils import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
CACHE = ROOT / ".bench"
HEADER = "# Benchmarks\n\nWritten by `make bench` (each section by the script named in it); never edited by hand.\n"
QUICK_BENCHMARKS = CACHE / "BENCHMARKS.quick.md"  # where `--quick` checks write: never BENCHMARKS.md

SAMPLE_S = 0.05  # how often `run_sampled` reads /proc


def proc_status_kib(pid: int) -> dict[str, int]:
    """The memory figures (kB) of /proc/PID/status (VmHWM, RssAnon, RssFile...); empty once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rows = [line.split(":", 1) for line in status]
    except OSError:
        return {}
    return {name: int(value.split()[0]) for name, value in rows if value.strip().endswith("kB")}


def descendants(pid: int) -> list[int]:
    """The process ids of `pid`'s children, their children, and so on."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def run_sampled(command: list[str], measure: Callable[[int], dict[str, int]]) -> tuple[str, dict[str, int], float]:
    """Run `command`, calling `measure(pid)` every SAMPLE_S while it runs: its output (stdout and stderr), the peak
    of each figure measured, and the wall seconds; exits naming the command if it fails."""
    import subprocess
    import threading

    peaks: dict[str, int] = {}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        while process.poll() is None:
            for name, value in measure(process.pid).items():
                peaks[name] = max(peaks.get(name, 0), value)
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed (exit {process.returncode}): {output}")
    return output, peaks, seconds


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """This machine's CPU as every section names it: core count and model."""
    return f"{os.cpu_count()} CPU cores ({cpu_model()})"


def machine() -> str:
    """CPU count and model, OS, Python; torch and the GPU too when the benchmark uses torch."""
    parts = [cpu_name(), platform.platform(terse=True), f"Python {platform.python_version()}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
        parts += [f"torch {torch.__version__}", gpu]
    return ", ".join(parts)


def corpus_files(name: str) -> list[Path]:
    """A corpus bundled with music21 as MIDI files (`midigen corpus`), exported into .bench/ on the first run only."""
    from midigen.data.corpus import export_corpus

    return export_corpus(name, CACHE / "corpus" / name, progress=False).paths


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(title: str, body: str, quick: bool = False) -> None:
    """Replace the section `## title` of BENCHMARKS.md (or add it), keeping every other section; a `--quick`
    check (not a measurement) writes to QUICK_BENCHMARKS instead."""
    command = " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])  # as run, options included
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"## {title}\n\n_{stamp}, `python {command}`, {machine()}._\n\n{body.strip()}\n"
    output = QUICK_BENCHMARKS if quick else BENCHMARKS
    text = output.read_text() if output.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, with_cpu_index(text))
    print(section)


STAMP_CPU = re.compile(r"_\d{4}-\d\d-\d\d \d\d:\d\d, `[^`]*`, (\d+ CPU cores \(.*?\)), ")
CPU_INDEX = re.compile(r"^CPUs \(.*\n(?:- .*\n)*\n?", re.M)


def with_cpu_index(text: str) -> str:
    """`text` with the list, above the first section, of the CPU each section ran on (from its first line), so
    that figures of sections from different CPUs are not compared unawares."""
    first = text.find("\n## ") + 1 if "\n## " in text else len(text)
    preamble, sections = CPU_INDEX.sub("", text[:first]), text[first:]
    by_cpu: dict[str, list[str]] = {}
    for title, first_line in re.findall(r"^## (.+)\n\n(.*)$", sections, re.M):
        match = STAMP_CPU.match(first_line)
        by_cpu.setdefault(match.group(1) if match else "CPU not recorded", []).append(title)
    if not by_cpu:
        return text
    index = ("CPUs (each section's first line names its own; compare figures of two sections only when their CPU "
             "is the same):\n" + "".join(f"- {cpu}: " + " · ".join(titles) + "\n" for cpu, titles in by_cpu.items()))
    return preamble.rstrip() + "\n\n" + index + "\n" + sections
