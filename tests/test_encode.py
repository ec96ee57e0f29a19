"""`encode_files`: bad files never take the run down, crashed and hung parsers are caught, and an
interrupted encode resumes to exactly what an uninterrupted one writes."""

from __future__ import annotations

import errno
import faulthandler
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SINGLE_STREAM
from midi_factory import make_score, million_note_score, write_score

from midigen.codec import load_tokenizer
from midigen.codec import sandbox
from midigen.errors import BadMidiError, MidigenError
from midigen.data import encode as encode_module
from midigen.data.encode import encode_files, input_paths
from midigen.data.store import KeyIndex, TokenStore

MELODY = [(0, 60, 4), (4, 62, 4), (8, 64, 8)]


def songs_of(store: Path) -> list[tuple[str, str, list[int]]]:
    """(file name, content hash, tokens) of every song, in order."""
    opened = TokenStore(store)
    return [(Path(s.path).name, s.hash, opened.song(i).tokens.tolist()) for i, s in enumerate(opened.songs)]


def copy_prompts(prompt_files: list[Path], folder: Path, copies: int = 1) -> list[Path]:
    """Real files; copy k gets k bytes of trailing padding, so that copies differ in content (hash)."""
    paths = []
    for copy in range(copies):
        for source in prompt_files:
            target = folder / f"c{copy}" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes() + b"\0" * copy)
            paths.append(target)
    return paths


@pytest.fixture(scope="module")
def million_note_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_score(tmp_path_factory.mktemp("big") / "million.mid", million_note_score())


@pytest.fixture
def bad_inputs(tmp_path: Path, prompt_files: list[Path], million_note_file: Path) -> dict[str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    real = prompt_files[0].read_bytes()
    inputs = {
        "good": write_score(folder / "good.mid", make_score([MELODY])),
        "zero length": folder / "empty.mid",
        "text renamed .mid": folder / "readme.mid",
        "random bytes": folder / "noise.mid",
        "truncated": folder / "truncated.mid",
        "no notes": write_score(folder / "silent.mid", make_score([[]])),
        "only drums": write_score(folder / "drums.mid", make_score([], drum_tracks=[[(0, 36, 1), (4, 38, 1)]])),
        "hour-long note": write_score(folder / "drone.mid", make_score([[(0, 48, 8 * 120 * 60), (2, 60, 4)]])),
        "beyond the grid": write_score(folder / "late.mid", make_score([[(0, 60, 4), (2**25, 62, 4)]], ticks_per_step=1)),
        "million notes": million_note_file,
        "missing": folder / "missing.mid",
        "symlink loop": folder / "loop.mid",
    }
    inputs["zero length"].write_bytes(b"")
    inputs["text renamed .mid"].write_text("these are my notes, not MIDI ones\n")
    inputs["random bytes"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    inputs["truncated"].write_bytes(real[: len(real) // 2])
    inputs["symlink loop"].symlink_to(inputs["symlink loop"])
    return inputs


EXPECTED_REASONS = {
    "zero length": "empty file (0 bytes)",
    "text renamed .mid": "not a MIDI file (no MThd header)",
    "random bytes": "not a MIDI file (no MThd header)",
    "truncated": "malformed MIDI: ",
    "no notes": "no notes",
    "only drums": "only drum notes (drums are dropped)",
    "missing": "no such file",
    "symlink loop": "cannot read: ",
    "beyond the grid": "timing out of range: notes beyond step 16777216 or before 0",
}


def test_bad_inputs_are_skipped_with_their_reason(tmp_path: Path, bad_inputs: dict[str, Path]) -> None:
    summary = encode_files(list(bad_inputs.values()), tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    report = summary.report
    reasons = dict(summary.skipped_now)
    for case, expected in EXPECTED_REASONS.items():
        assert reasons[os.path.abspath(bad_inputs[case])].startswith(expected), case
    assert report["files"] == len(bad_inputs) and report["encoded"] == 3 and report["skipped_count"] == len(EXPECTED_REASONS)
    named = {entry["path"] for entries in report["skipped"].values() for entry in entries}
    assert named == {os.path.abspath(bad_inputs[case]) for case in EXPECTED_REASONS}
    store = TokenStore(tmp_path / "store")
    encoded = {Path(song.path).name: song for song in store.songs}
    assert set(encoded) == {"good.mid", "drone.mid", "million.mid"}
    assert encoded["million.mid"].notes == 1_000_000 and encoded["million.mid"].length == 4 * 1_000_000
    drone = load_tokenizer(store.config).decode_sparse(store.song(store.songs.index(encoded["drone.mid"])).tokens)
    assert drone.notes() == {(0, 48, store.config.max_duration), (2, 60, 4)}  # the hour is clamped


def test_a_file_that_fails_when_tokenised_together_fails_alone(bad_inputs: dict[str, Path]) -> None:
    """Files are parsed one by one, then tokenised together: a file that fails there is skipped, not its batch."""
    names = ("good", "beyond the grid", "hour-long note", "no notes", "million notes")
    tokenizer = load_tokenizer(SINGLE_STREAM)
    results = sandbox.encode_together([str(bad_inputs[name]) for name in names], tokenizer)
    assert results[1] == sandbox.Skip(EXPECTED_REASONS["beyond the grid"])
    assert results[3] == sandbox.Skip("no notes")
    for name, result in zip(names, results):
        if name in ("good", "hour-long note", "million notes"):
            assert isinstance(result, sandbox.EncodedSong)
            np.testing.assert_array_equal(result.sequence(tokenizer).tokens, tokenizer.encode(bad_inputs[name]).tokens)


def test_unreadable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The system refuses to open one file (as it does a file without read permission, to anyone but root: the
    refusal is faked so that the test runs as root too); the forked workers skip it and encode the others."""
    locked = write_score(tmp_path / "locked.mid", make_score([MELODY]))
    readable = write_score(tmp_path / "readable.mid", make_score([MELODY[:2]]))
    real_open = os.open

    def open_unless_locked(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_unless_locked)  # inherited by the forked workers
    summary = encode_files([locked, readable], tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    assert summary.skipped_now == [(str(locked), "permission denied")]
    assert [Path(song.path).name for song in TokenStore(tmp_path / "store").songs] == ["readable.mid"]


def fail_on(name: str, failure: str) -> Callable[[str], sandbox.ParsedFile | sandbox.Skip]:
    """A stand-in for `sandbox.parse_one` that crashes or hangs on the file called `name`."""
    real_parse_one = sandbox.parse_one

    def parse_one(path: str) -> sandbox.ParsedFile | sandbox.Skip:
        if Path(path).name == name:
            if failure == "crash":
                faulthandler.disable()  # pytest's handler would print the crash; a parser's crash is silent
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(60)
        return real_parse_one(path)

    return parse_one


@pytest.mark.parametrize(("failure", "reason"), [("crash", "parser crashed: SIGSEGV"), ("hang", "timed out: no result after 1 s")])
@pytest.mark.parametrize("victim_index", [5, -1])  # -1: the other worker has run out of work and exited
def test_crashed_or_hung_parser_skips_only_its_file(
    tmp_path: Path, prompt_files: list[Path], monkeypatch: pytest.MonkeyPatch, failure: str, reason: str,
    victim_index: int,
) -> None:
    # the forked workers inherit the stand-in
    victim = prompt_files[victim_index]
    monkeypatch.setattr(sandbox, "parse_one", fail_on(victim.name, failure))
    summary = encode_files(prompt_files, tmp_path / "store", SINGLE_STREAM, workers=2, timeout_s=1, progress=False)
    assert summary.skipped_now == [(str(victim), reason)]
    assert multiprocessing.active_children() == []  # every worker, the failed one included, has been reaped
    monkeypatch.undo()
    reference = encode_files([p for p in prompt_files if p != victim], tmp_path / "reference", SINGLE_STREAM, workers=1, progress=False)
    assert songs_of(tmp_path / "store") == songs_of(reference.store)


def test_a_crash_mid_chunk_blames_one_file_and_retries_the_rest(
    tmp_path: Path, prompt_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # one worker takes chunks of several files: the victims have files before and after them in theirs
    paths = [str(p) for p in copy_prompts(prompt_files, tmp_path, copies=2)]
    victim = Path(paths[13])  # and its copy, paths[32]
    monkeypatch.setattr(sandbox, "parse_one", fail_on(victim.name, "crash"))
    results = list(sandbox.encode_in_workers(iter(paths), len(paths), SINGLE_STREAM, workers=1))
    assert [(index, path) for index, path, _ in results] == list(enumerate(paths))
    tokenizer = load_tokenizer(SINGLE_STREAM)
    for index, _, result in results:
        if Path(paths[index]).name == victim.name:
            assert result == sandbox.Skip("parser crashed: SIGSEGV")
        else:
            assert isinstance(result, sandbox.EncodedSong)
            np.testing.assert_array_equal(result.sequence(tokenizer).tokens, tokenizer.encode(paths[index]).tokens)


def test_workers_held_back_by_a_slow_file_go_on_once_it_is_done(
    tmp_path: Path, prompt_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # one file per chunk and a window of 8 files: the other worker encodes files 1-7 while the first file takes
    # a second, then waits; when that file is done both workers are idle, with work left that the window now lets out
    paths = [str(p) for p in prompt_files]
    real_parse_one = sandbox.parse_one

    def slow_first(path: str) -> sandbox.ParsedFile | sandbox.Skip:
        if path == paths[0]:
            time.sleep(1)
        return real_parse_one(path)

    monkeypatch.setattr(sandbox, "parse_one", slow_first)
    monkeypatch.setattr(sandbox, "MAX_CHUNK", 1)
    results = list(sandbox.encode_in_workers(iter(paths), len(paths), SINGLE_STREAM, workers=2))
    assert [(index, path) for index, path, _ in results] == list(enumerate(paths))
    assert all(isinstance(result, sandbox.EncodedSong) for _, _, result in results)


def test_files_gone_between_counting_and_encoding_stop_the_encode_with_one_line(prompt_files: list[Path]) -> None:
    paths = [str(p) for p in prompt_files[:3]]
    with pytest.raises(MidigenError, match="changed while encoding"):
        list(sandbox.encode_in_workers(iter(paths), len(paths) + 2, SINGLE_STREAM, workers=1))


def test_store_does_not_depend_on_the_number_of_workers(tmp_path: Path, prompt_files: list[Path]) -> None:
    inputs = copy_prompts(prompt_files, tmp_path / "in", copies=3)
    one = encode_files(inputs, tmp_path / "one", SINGLE_STREAM, workers=1, progress=False)
    three = encode_files(inputs, tmp_path / "three", SINGLE_STREAM, workers=3, progress=False)
    assert songs_of(one.store) == songs_of(three.store)
    assert one.report == three.report and one.report["encoded"] == len(inputs)


def test_interrupted_encode_resumes_without_redoing_anything(
    tmp_path: Path, prompt_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = copy_prompts(prompt_files, tmp_path / "in", copies=2)
    reference = encode_files(inputs, tmp_path / "reference", SINGLE_STREAM, workers=2, progress=False)
    real_record = encode_module._record
    recorded: list[str] = []

    def record_then_interrupt(writer, path, result, summary) -> None:  # noqa: ANN001
        if len(recorded) == 11:
            raise KeyboardInterrupt  # as Ctrl-C lands in the parent
        recorded.append(path)
        real_record(writer, path, result, summary)

    monkeypatch.setattr(encode_module, "_record", record_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        encode_files(inputs, tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    partial = TokenStore(tmp_path / "store")
    assert not partial.complete and [s.path for s in partial.songs] == recorded
    monkeypatch.undo()
    resumed = encode_files(inputs, tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    assert resumed.already_done == 11 and resumed.new_songs == len(inputs) - 11
    assert songs_of(tmp_path / "store") == songs_of(reference.store)
    assert resumed.report == reference.report


KILLABLE_ENCODE = """
import sys, time
from midigen.codec import sandbox
from midigen.errors import BadMidiError, MidigenError
from midigen.data import encode
from midigen.cli.main import main
real = sandbox.parse_one
def slow(path):
    time.sleep(0.02)
    return real(path)
sandbox.parse_one = slow
encode.FLUSH_INTERVAL_S = 0  # write each song's row as soon as it is done
sys.exit(main(sys.argv[1:]))
"""


def test_killed_encode_resumes_to_the_same_store(tmp_path: Path, prompt_files: list[Path]) -> None:
    inputs = copy_prompts(prompt_files, tmp_path / "in", copies=6)
    store = tmp_path / "store"
    command = [sys.executable, "-c", KILLABLE_ENCODE, "encode", str(tmp_path / "in"), "-o", str(store), "--workers", "2", "--single-stream", "--quiet"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    songs_file = store / "songs.jsonl"
    deadline = time.monotonic() + 30
    while not (songs_file.exists() and songs_file.read_bytes().count(b"\n") >= 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = TokenStore(store)
    assert not written.complete and 20 <= len(written) < len(inputs)
    resumed = encode_files([tmp_path / "in"], store, SINGLE_STREAM, workers=2, progress=False)
    assert resumed.already_done == len(written) and resumed.report["skipped_count"] == 0
    reference = encode_files([tmp_path / "in"], tmp_path / "reference", SINGLE_STREAM, workers=2, progress=False)
    assert songs_of(store) == songs_of(reference.store)
    assert (store / "tokens.bin").stat().st_size == 2 * resumed.report["tokens"]


HANGING_ENCODE = """
import sys, time
from midigen.codec import sandbox
from midigen.errors import BadMidiError, MidigenError
from midigen.cli.main import main
sandbox.parse_one = lambda path: time.sleep(600)
sys.exit(main(sys.argv[1:]))
"""


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_encode(tmp_path: Path, prompt_files: list[Path]) -> None:
    # killing only the encoding process, while its workers are stuck in a parse that never ends
    command = [sys.executable, "-c", HANGING_ENCODE, "encode", *map(str, prompt_files), "-o", str(tmp_path / "store"), "--workers", "2", "--single-stream", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(workers := children_of(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)


def test_duplicates_and_repeated_inputs(tmp_path: Path, prompt_files: list[Path]) -> None:
    original, twin = tmp_path / "in" / "a" / "song.mid", tmp_path / "in" / "b" / "same song.MID"
    for path in (original, twin):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(prompt_files[0], path)
    (tmp_path / "in" / "notes.txt").write_text("not MIDI, not looked at")
    inputs = [tmp_path / "in", tmp_path / "in", original, prompt_files[1]]
    summary = encode_files(inputs, tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    assert [Path(song.path) for song in TokenStore(summary.store).songs] == [original, prompt_files[1]]
    assert summary.skipped_now == [(str(twin), f"duplicate: same content as {original}")]


@pytest.mark.parametrize("block", [2, KeyIndex.BLOCK], ids=["merged-every-2-songs", "default-block"])
def test_duplicates_of_songs_encoded_in_an_earlier_run_name_them(tmp_path: Path, prompt_files: list[Path],
                                                                  block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KeyIndex, "BLOCK", block)
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in prompt_files[:5]:
        shutil.copy(path, copies / f"copy of {path.name}")
    store = tmp_path / "store"
    encode_files(prompt_files[:5], store, SINGLE_STREAM, workers=2, progress=False)
    summary = encode_files([*prompt_files[:5], copies, prompt_files[5]], store, SINGLE_STREAM, workers=2,
                           progress=False)
    assert summary.already_done == 5 and summary.new_songs == 1
    assert summary.skipped_now == [(str(copies / f"copy of {path.name}"), f"duplicate: same content as {path}")
                                   for path in sorted(prompt_files[:5], key=lambda p: f"copy of {p.name}")]


def test_the_content_index_answers_as_a_dict_across_its_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KeyIndex, "BLOCK", 7)
    rng = np.random.default_rng(0)
    keys = [int(key) for key in rng.integers(0, 2**64, size=100, dtype=np.uint64)]
    index, expected = KeyIndex(keys[:30], range(30)), dict(zip(keys[:30], range(30)))
    for value, key in enumerate(keys[30:], 30):
        index.add(key, value)
        expected[key] = value
        assert index.get(key) == value
    assert len(index) == 100 and all(index.get(key) == value for key, value in expected.items())
    assert index.get(2**64 - 1) is None and index.get(0) is None and KeyIndex().get(5) is None


def test_input_paths_are_absolute_recursive_sorted_and_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("b/2.midi", "b/1.MID", "a.mid", "a.txt", "c/d/e.mid"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / os.fsdecode(b"b/\xff.mid")).write_bytes(b"")  # a name that is not UTF-8 comes back as it was
    monkeypatch.chdir(tmp_path)
    assert list(input_paths([".", "a.mid", "missing.mid", "b", "c/d/e.mid", "c/"])) == [
        str(tmp_path / name) for name in ("a.mid", "b/1.MID", "b/2.midi", os.fsdecode(b"b/\xff.mid"), "c/d/e.mid",
                                          "missing.mid")
    ]


def test_rerun_on_a_finished_store_changes_nothing(tmp_path: Path, prompt_files: list[Path]) -> None:
    first = encode_files(prompt_files[:4], tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    again = encode_files(prompt_files[:4], tmp_path / "store", SINGLE_STREAM, workers=2, progress=False)
    assert again.new_songs == 0 and again.already_done == 4 and again.report == first.report
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert json.loads((tmp_path / "store" / "report.json").read_text()) == first.report


def test_encoding_never_imports_torch() -> None:
    """Encoder workers (forked by the thousand on big collections) stay light: the codec and the encoder do not
    load torch, which only generation and training need."""
    code = "import sys, midigen.data.encode, midigen.codec; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("failure", "reason"), [("crash", "parser crashed: SIGSEGV"), ("hang", "timed out: no result after 1 s")])
def test_an_isolated_encoder_keeps_its_worker_until_a_file_breaks_it(
    prompt_files: list[Path], monkeypatch: pytest.MonkeyPatch, failure: str, reason: str
) -> None:
    # the studio's parser of uploads: one worker serves file after file; the file that kills it costs only itself
    good, other, victim = prompt_files[:3]
    monkeypatch.setattr(sandbox, "parse_one", fail_on(victim.name, failure))  # before the worker forks
    tokenizer = load_tokenizer(SINGLE_STREAM)
    encoder = sandbox.IsolatedEncoder(SINGLE_STREAM, timeout_s=1)
    try:
        songs = [encoder.encode(good), encoder.encode(other)]
        workers = multiprocessing.active_children()
        assert len(workers) == 1
        for path, song in zip((good, other), songs):
            np.testing.assert_array_equal(song.sequence(tokenizer).tokens, tokenizer.encode(path).tokens)
        with pytest.raises(BadMidiError, match=f"{victim.name}.*{reason}"):
            encoder.encode(victim)
        assert not workers[0].is_alive()
        again = encoder.encode(good)  # on a fresh worker
        np.testing.assert_array_equal(again.sequence(tokenizer).tokens, songs[0].sequence(tokenizer).tokens)
        assert [child.pid for child in multiprocessing.active_children()] != [workers[0].pid]
    finally:
        encoder.close()
    assert multiprocessing.active_children() == []
