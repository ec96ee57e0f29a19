"""`midigen train` and `midigen eval` on bad input: a missing, empty, damaged or unfinished store, a run folder
with a damaged or missing file, a store of another tokenizer. Each is refused with one line naming the file and
the reason, and exit status 2 (a damaged training log is repaired instead: it should not stop a run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SINGLE_STREAM

from midigen.data.encode import encode_files
from midigen.training.config import TrainConfig

DATA = Path(__file__).parent / "data" / "prompts"


def midigen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midigen", *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def midigen_all(commands: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once (each spends most of its time importing torch)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: midigen(*args), commands))


def assert_refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit status 2 and one error line, holding `words`, with no traceback."""
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def rewrite_rows(path: Path, change: Callable[[list[dict]], object]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def damaged_stores(store: Path, tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """Store folders damaged one way each, and the words their refusal must hold."""
    cases: dict[str, tuple[Path, list[str]]] = {}

    def variant(name: str, damage: Callable[[Path], object], *words: str) -> None:
        folder = copy_of(store, tmp_path, name)
        damage(folder)
        cases[name] = (folder, [str(folder), *words])

    cases["missing"] = (tmp_path / "no-such-store", [str(tmp_path / "no-such-store"), "not a token store"])
    (tmp_path / "empty-folder").mkdir()
    cases["empty folder"] = (tmp_path / "empty-folder", [str(tmp_path / "empty-folder"), "not a token store"])
    variant("no tokenizer", lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json")
    variant("tokenizer not json", lambda f: (f / "tokenizer.json").write_bytes(os.urandom(64)), "tokenizer.json")
    variant("index not json", lambda f: (f / "songs.jsonl").write_text("{broken\n"), "songs.jsonl", "line 1")
    variant("index row not an object", lambda f: (f / "songs.jsonl").write_text("[1, 2]\n"), "songs.jsonl",
            "not a JSON object")
    variant("negative length", lambda f: rewrite_rows(f / "songs.jsonl", lambda rows: rows[1].update(length=-5)),
            "songs.jsonl", "line 2", "length")
    variant("rows out of order", lambda f: rewrite_rows(f / "songs.jsonl", lambda rows: rows.reverse()),
            "songs.jsonl", "line 1", "starts at token")
    variant("truncated tokens", lambda f: os.truncate(f / "tokens.bin", 10), "tokens.bin", "shorter than its index")
    variant("report not json", lambda f: (f / "report.json").write_text("{\"files\": "), "report.json", "damaged")
    variant("report not an object", lambda f: (f / "report.json").write_text("[]"), "report.json", "damaged")
    variant("unfinished", lambda f: (f / "report.json").unlink(), "unfinished")
    variant("no songs", lambda f: (f / "songs.jsonl").write_text(""), "holds no songs")
    return cases


def test_train_and_eval_refuse_a_bad_store_in_one_line(prompt_store: Path, tiny_run: Path, tmp_path: Path) -> None:
    run = copy_of(tiny_run, tmp_path, "run")
    stores = damaged_stores(prompt_store, tmp_path)
    commands = [command for case, (store, _) in stores.items() for command in (
        ["train", str(store), "-o", str(tmp_path / f"run-{case}"), "--max-steps", "1", "--quiet"],
        ["train", str(store), "-o", str(run), "--resume", "--quiet"],
        ["eval", str(run), "--data", str(store)])]
    done = iter(midigen_all(commands))
    for case, (store, words) in stores.items():
        for _ in range(3):
            assert_refused(next(done), *words)
        assert not (tmp_path / f"run-{case}").exists(), case  # nothing is written for a store that cannot be used
    assert_refused(midigen("eval", str(run), "--data", str(prompt_store), "--batch-size", "0"), "--batch-size")


@pytest.fixture(scope="module")
def other_tokenizer_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("other") / "store"
    encode_files(sorted(DATA.glob("*.mid"))[:3], store, replace(SINGLE_STREAM, max_duration=64), workers=1, progress=False)
    return store


def test_a_store_of_another_tokenizer_is_refused(tiny_run: Path, other_tokenizer_store: Path, tmp_path: Path) -> None:
    store, run = str(other_tokenizer_store), copy_of(tiny_run, tmp_path, "run")
    for done in midigen_all([["train", store, "-o", str(run), "--resume", "--quiet"],
                             ["eval", str(run), "--data", store]]):
        assert_refused(done, store, "another tokenizer")


def test_a_run_folder_with_a_bad_file_is_refused(tiny_run: Path, prompt_store: Path, tmp_path: Path) -> None:
    store = str(prompt_store)
    # file, damage, what the refusal of a resume says, whether eval (which reads only the weights) refuses too
    cases = {
        "config missing": ("config.json", lambda f: (f / "config.json").unlink(), "no config.json", True),
        "config not json": ("config.json", lambda f: (f / "config.json").write_text("{"), "not readable JSON", True),
        "train config bad": ("config.json", lambda f: (f / "config.json").write_text(
            (tiny_run / "config.json").read_text().replace('"eval_interval": 15', '"eval_interval": 0')),
            "eval_interval must be >= 1", False),
        "checkpoint missing": ("checkpoint.safetensors", lambda f: (f / "checkpoint.safetensors").unlink(),
                               "nothing to resume", True),
        "checkpoint truncated": ("checkpoint.safetensors", lambda f: os.truncate(f / "checkpoint.safetensors", 100),
                                 "not a safetensors file", True),
        "rank state random": ("checkpoint.rank0.safetensors",
                              lambda f: (f / "checkpoint.rank0.safetensors").write_bytes(os.urandom(500)),
                              "not a safetensors file", False),
    }
    commands, expected = [], []
    for case, (name, damage, reason, eval_refuses) in cases.items():
        run = copy_of(tiny_run, tmp_path, case)
        damage(run)
        commands.append(["train", store, "-o", str(run), "--resume", "--max-steps", "31", "--quiet"])
        expected.append((str(run), name, reason))
        if eval_refuses:
            commands.append(["eval", str(run), "--data", store])
            expected.append((str(run), name))
    for done, words in zip(midigen_all(commands), expected, strict=True):
        assert_refused(done, *words)


def test_resume_repairs_a_damaged_log_and_keeps_the_original(tiny_run: Path, prompt_store: Path,
                                                             tmp_path: Path) -> None:
    run = copy_of(tiny_run, tmp_path, "run")
    original = (run / "metrics.jsonl").read_bytes()
    lines = original.splitlines(keepends=True)
    damaged = lines[0] + b"\xff\xfe not a row\n" + lines[1] + b'{"step": "three"}\n' + b"".join(lines[2:])
    (run / "metrics.jsonl").write_bytes(damaged + b'{"step": 31, "train_lo')  # and a torn last line
    done = midigen("train", str(prompt_store), "-o", str(run), "--resume", "--max-steps", "31", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"{run / 'metrics.jsonl'}: dropped 2 damaged line(s) (line 2, 4)" in done.stderr
    assert "metrics.jsonl.damaged" in done.stderr and "Traceback" not in done.stderr
    assert (run / "metrics.jsonl.damaged").read_bytes() == damaged + b'{"step": 31, "train_lo'
    repaired = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert repaired[: len(lines)] == lines  # every valid row kept, as it was
    assert [json.loads(line)["step"] for line in repaired[len(lines):]] == [31, 31]  # the last step, its validation


def test_train_takes_its_defaults_from_train_config(prompt_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()  # where an attempt logged a step, then died before its first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 7, "train_loss": 5.0}\n')
    done = midigen("train", str(prompt_store), "-o", str(run), "--preset", "tiny", "--max-steps", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {1}
    saved = json.loads((run / "config.json").read_text())["train"]
    assert TrainConfig.from_dict(saved, complete=True) == TrainConfig(max_steps=1)
    # a resume keeps the run's settings and budget, and says which options it does not use
    done = midigen("train", str(prompt_store), "-o", str(run), "--resume", "--lr", "0.5", "--seed", "3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "a resumed run keeps its settings; ignoring --lr, --seed" in done.stderr
    assert "used its budget (max_steps) at step 1" in done.stderr
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"]) == TrainConfig(max_steps=1)
    done = midigen("train", str(prompt_store), "-o", str(run), "--resume", "--max-steps", "2", "--quiet")
    assert done.returncode == 0 and "at step 2" in done.stdout, done.stderr
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())["train"]) == TrainConfig(max_steps=2)
