"""Sharded encoding and `midigen merge`: the shards of an encode, merged in any order, equal one encode."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SINGLE_STREAM

from midigen.cli.main import main
from midigen.data.encode import Shard, encode_files
from midigen.data.store import TokenStore
from midigen.errors import MidigenError

PROMPTS = Path(__file__).parent / "data" / "prompts"


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real prompts, a copy of one under another name (a duplicate) and a file that is not MIDI."""
    folder = tmp_path_factory.mktemp("collection") / "midi"
    shutil.copytree(PROMPTS, folder)
    first = sorted(folder.glob("*.mid"))[0]
    shutil.copy(first, folder / "zz_copy_of_the_first.mid")
    (folder / "broken.mid").write_bytes(b"MThd but not really")
    return folder


def store_content(root: Path) -> dict:
    store = TokenStore(root)
    report = dict(store.report or {})
    report["skipped"] = {reason: sorted(rows, key=lambda r: r["path"]) for reason, rows in report["skipped"].items()}
    return {
        "config": store.config,
        "songs": list(store.songs),
        "arrays": {name: array.tobytes() for name, array in store.arrays.items()},
        "skipped": sorted((s.path, s.reason) for s in store.skipped()),
        "report": report,
    }


def test_shards_merged_in_any_order_equal_one_encode(collection: Path, tmp_path: Path) -> None:
    encode_files([collection], tmp_path / "whole", SINGLE_STREAM, workers=2, progress=False)
    for index in range(3):
        encode_files([collection], tmp_path / f"shard{index}", SINGLE_STREAM, workers=2, progress=False, shard=Shard(index, 3))
    sizes = [len(TokenStore(tmp_path / f"shard{i}")) + len(TokenStore(tmp_path / f"shard{i}").skipped())
             for i in range(3)]
    assert max(sizes) - min(sizes) <= 1  # equal shares of the files
    code = main(["merge", *(str(tmp_path / f"shard{i}") for i in (2, 0, 1)), "-o", str(tmp_path / "merged"),
                 "--quiet"])
    assert code == 0
    merged, whole = store_content(tmp_path / "merged"), store_content(tmp_path / "whole")
    assert merged == whole
    assert any(reason.startswith("duplicate") for _, reason in merged["skipped"])


def test_shards_cover_every_file_once() -> None:
    paths = [f"f{i}" for i in range(23)]
    shards = [[paths[position] for position in Shard(index, 5).of(len(paths))] for index in range(5)]
    assert sum(shards, []) == paths and all(len(shard) in (4, 5) for shard in shards)


@pytest.mark.parametrize("text", ["3", "a/b", "4/4", "-1/3", "0/0"])
def test_bad_shard_is_one_line(text: str, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["encode", str(collection), "-o", str(tmp_path / "s"), f"--shard={text}", "--single-stream", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "shard" in err


def test_merge_refuses_stores_it_cannot_join(collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    encode_files([collection], tmp_path / "a", SINGLE_STREAM, workers=2, progress=False, shard=Shard(0, 2))
    encode_files([collection], tmp_path / "b", SINGLE_STREAM, workers=2, progress=False, shard=Shard(1, 3))
    encode_files([collection], tmp_path / "c", replace(SINGLE_STREAM, steps_per_quarter=4), workers=2, progress=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tmp_path / "a", unfinished)
    (unfinished / "report.json").unlink()
    cases = {"other tokenizer": (["a", "c"], "another tokenizer config"),
             "other encode's shards": (["a", "b"], "shards of different encodes"),
             "unfinished": (["unfinished"], "unfinished"),
             "not a store": (["nothing"], "not a token store")}
    for name, (stores, message) in cases.items():
        code = main(["merge", *(str(tmp_path / s) for s in stores), "-o", str(tmp_path / f"out-{name}"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()
    with pytest.raises(MidigenError, match="another share"):
        encode_files([collection], tmp_path / "a", SINGLE_STREAM, workers=2, progress=False, shard=Shard(1, 2))
