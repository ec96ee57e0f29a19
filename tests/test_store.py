"""The token store's format: what a trainer memory-maps, song by song, and how a damaged or
unfinished store is read, repaired or refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import SINGLE_STREAM
from midi_factory import grid_notes_of

from midigen.codec import TokenizerConfig, load_tokenizer, read_notes
from midigen.data.encode import encode_files
from midigen.data.splits import SPLITS, split_of
from midigen.data.store import StoreWriter, TokenStore
from midigen.errors import MidigenError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prompt_files: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("store") / "prompts"
    encode_files(prompt_files, root, replace(SINGLE_STREAM, max_duration=64), workers=2, progress=False)
    return root


def test_files_of_a_finished_store(store: Path, prompt_files: list[Path]) -> None:
    names = {p.name for p in store.iterdir()}
    assert names == {"tokenizer.json", "tokens.bin", "steps.bin", "bars.bin", "beats.bin", "songs.jsonl", "skipped.jsonl", "report.json", ".lock"}
    assert TokenizerConfig.load(store / "tokenizer.json") == replace(SINGLE_STREAM, max_duration=64)
    rows = [json.loads(line) for line in (store / "songs.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in prompt_files]
    assert [row["hash"] for row in rows] == [hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() for p in prompt_files]
    assert [row["start"] for row in rows] == np.cumsum([0] + [row["length"] for row in rows[:-1]]).tolist()
    assert all(row["split"] == split_of(row["path"]) for row in rows)
    report = json.loads((store / "report.json").read_text())
    assert report["files"] == report["encoded"] == len(prompt_files) and report["skipped"] == {}
    assert report["tokens"] == sum(row["length"] for row in rows) == (store / "tokens.bin").stat().st_size // 2
    assert sum(report["splits"][s] for s in SPLITS) == len(prompt_files)


def test_a_trainer_can_memory_map_the_arrays_without_midigen(store: Path, prompt_files: list[Path]) -> None:
    rows = [json.loads(line) for line in (store / "songs.jsonl").read_text().splitlines()]
    tokens = np.memmap(store / "tokens.bin", dtype=np.uint16, mode="r")
    beats = np.memmap(store / "beats.bin", dtype=np.uint16, mode="r")
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, max_duration=64))
    for row, path in zip(rows, prompt_files):
        direct = tokenizer.encode(path)
        window = slice(row["start"], row["start"] + row["length"])
        np.testing.assert_array_equal(tokens[window], direct.tokens)
        np.testing.assert_array_equal(beats[window], direct.beats)


def test_read_song_i_back_and_decode_it(store: Path, prompt_files: list[Path]) -> None:
    opened = TokenStore(store)
    assert opened.complete and len(opened) == len(prompt_files)
    assert {name: array.dtype for name, array in opened.arrays.items()} == {
        "tokens": np.uint16, "steps": np.uint32, "bars": np.uint32, "beats": np.uint16
    }
    assert all(isinstance(array, np.memmap) for array in opened.arrays.values())
    tokenizer = load_tokenizer(opened.config)
    for i in (0, 7, len(opened) - 1):
        song, direct = opened.song(i), tokenizer.encode(prompt_files[i])
        for name in ("tokens", "steps", "bars", "beats"):
            np.testing.assert_array_equal(getattr(song, name), getattr(direct, name))
        assert grid_notes_of(tokenizer.decode(song), 8) == tokenizer.sparse_score(prompt_files[i]).notes()
        assert opened.songs[i].notes == len(read_notes(prompt_files[i]))
    assert sorted(i for split in SPLITS for i in opened.split_indices(split)) == list(range(len(opened)))


def test_unfinished_store_with_a_torn_row_and_extra_tokens_is_read_and_repaired(
    tmp_path: Path, store: Path, prompt_files: list[Path]
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    (damaged / "report.json").unlink()  # as while an encode runs
    rows = (damaged / "songs.jsonl").read_bytes().splitlines(keepends=True)
    kept = 12
    # the writer died after writing song 13's tokens (and some of song 14's) and half of song 13's row
    (damaged / "songs.jsonl").write_bytes(b"".join(rows[:kept]) + rows[kept][:20])
    with open(damaged / "tokens.bin", "r+b") as handle:
        handle.truncate(2 * (json.loads(rows[kept + 1])["start"] + 5))
    opened = TokenStore(damaged)
    assert not opened.complete and len(opened) == kept
    assert opened.num_tokens == json.loads(rows[kept])["start"]
    resumed = encode_files(prompt_files, damaged, replace(SINGLE_STREAM, max_duration=64), workers=2, progress=False)
    assert resumed.already_done == kept and resumed.new_songs == len(prompt_files) - kept
    for name in ("tokenizer.json", "songs.jsonl", "tokens.bin", "steps.bin", "bars.bin", "beats.bin", "report.json"):
        assert (damaged / name).read_bytes() == (store / name).read_bytes(), name


def test_store_shorter_than_its_index_is_refused(tmp_path: Path, store: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    with open(damaged / "bars.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(MidigenError, match="store is damaged"):
        TokenStore(damaged)
    with pytest.raises(MidigenError, match="store is damaged"):
        StoreWriter(damaged, replace(SINGLE_STREAM, max_duration=64))


def test_corrupt_index_row_is_refused(tmp_path: Path, store: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    rows = (damaged / "songs.jsonl").read_text().splitlines(keepends=True)
    (damaged / "songs.jsonl").write_text("".join(rows[:3]) + "{not json\n" + "".join(rows[4:]))
    with pytest.raises(MidigenError, match="line 4"):
        TokenStore(damaged)


def test_writer_refuses_other_folders_configs_and_a_second_writer(tmp_path: Path, store: Path) -> None:
    with pytest.raises(MidigenError, match="different tokenizer config"):
        StoreWriter(store, SINGLE_STREAM)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(MidigenError, match="not empty and is not a token store"):
        StoreWriter(tmp_path / "photos", SINGLE_STREAM)
    with pytest.raises(MidigenError, match="not a token store"):
        TokenStore(tmp_path / "photos")
    (tmp_path / "file").write_text("")
    with pytest.raises(MidigenError, match="not a folder"):
        StoreWriter(tmp_path / "file", SINGLE_STREAM)
    with StoreWriter(tmp_path / "new", SINGLE_STREAM):
        with pytest.raises(MidigenError, match="another encode is writing"):
            _lock_from_another_process(tmp_path / "new")


def _lock_from_another_process(root: Path) -> None:
    """Open a writer on `root` in a child process (locks are per process) and re-raise its error here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            StoreWriter(root, SINGLE_STREAM)
            message = b""
        except MidigenError as exc:
            message = str(exc).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    if message:
        raise MidigenError(message)


def test_empty_store_opens(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "empty", SINGLE_STREAM) as writer:
        report = writer.finish()
    assert report["files"] == report["encoded"] == report["tokens"] == 0
    opened = TokenStore(tmp_path / "empty")
    assert len(opened) == 0 and opened.complete and opened.arrays["tokens"].size == 0


def test_the_song_index_reads_each_entry_as_its_row_says(store: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (store / "songs.jsonl").read_text().splitlines()]
    opened = TokenStore(store)
    assert len(opened.songs) == len(rows) > 2
    as_json = lambda entry: json.loads(json.dumps(entry.row()))  # noqa: E731
    assert [as_json(entry) for entry in opened.songs] == rows  # iterating
    assert [as_json(opened.songs[i]) for i in range(len(rows))] == rows  # one at a time
    assert as_json(opened.songs[-1]) == rows[-1]
    assert opened.songs.lengths.tolist() == [row["length"] for row in rows]
    assert opened.songs.starts.tolist() == [row["start"] for row in rows]
    assert opened.songs.notes.tolist() == [row["notes"] for row in rows]
    for split in SPLITS:
        assert opened.split_indices(split) == [i for i, row in enumerate(rows) if row["split"] == split]
    with pytest.raises(IndexError):
        opened.songs[len(rows)]
    # rows appended after the store was opened (an encode resuming) are not part of this reader's songs
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    reader = TokenStore(copy)
    with open(copy / "songs.jsonl", "a") as handle:
        handle.write(json.dumps(rows[0] | {"start": reader.num_tokens, "length": 0}) + "\n")
    assert len(list(reader.songs)) == len(reader.songs) == len(rows)
