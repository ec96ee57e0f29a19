"""`midigen encode` and `midigen roundtrip` from the command line: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import symusic
from conftest import SINGLE_STREAM
from midi_factory import grid_notes_of, make_score, write_score

from midigen.cli.main import main
from midigen.codec import sandbox
from midigen.data.store import TokenStore


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midigen", *args], capture_output=True, text=True, timeout=120)


def test_encode_exits_0_when_a_file_was_encoded(tmp_path: Path, prompt_files: list[Path]) -> None:
    (tmp_path / "broken.mid").write_bytes(b"MThd garbage")
    result = run_cli("encode", str(prompt_files[0]), str(tmp_path / "broken.mid"), "-o", str(tmp_path / "store"), "--workers", "2", "--single-stream", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"skipped {tmp_path / 'broken.mid'}: malformed MIDI" in result.stdout
    assert "1 songs" in result.stdout and "1 skipped in all" in result.stdout
    assert len(TokenStore(tmp_path / "store")) == 1


def test_encode_exits_2_when_nothing_could_be_encoded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.mid").write_bytes(b"")
    code = main(["encode", str(tmp_path / "empty.mid"), str(tmp_path / "missing.mid"), "-o", str(tmp_path / "store"), "--single-stream", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no file could be encoded (2 tried" in err
    assert TokenStore(tmp_path / "store").complete  # the report names the skipped files


def test_encode_passes_the_tokenizer_options(tmp_path: Path, prompt_files: list[Path]) -> None:
    args = ["encode", str(prompt_files[0]), "-o", str(tmp_path / "store"), "--steps-per-quarter", "4", "--max-duration", "32",
            "--single-stream", "--keep-unisons", "--quiet"]
    assert main(args) == 0
    assert TokenStore(tmp_path / "store").config == replace(SINGLE_STREAM, steps_per_quarter=4, max_duration=32,
                                                            merge_unisons=False)
    # rerunning the same store with other options is refused in one line
    assert main(["encode", str(prompt_files[0]), "-o", str(tmp_path / "store"), "--single-stream", "--quiet"]) == 2


def test_roundtrip_writes_what_the_encoding_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_score(tmp_path / "in.mid", make_score([[(0, 60, 4), (0, 60, 2), (4, 64, 400)]], time_signatures=[(0, 3, 4)], tempos=[(0, 72.0)]))
    assert main(["roundtrip", str(source), "-o", str(tmp_path / "out" / "out.mid"), "--max-duration", "64", "--single-stream"]) == 0
    out = capsys.readouterr().out
    assert "3 notes in, 2 out" in out and "1 merged, 1 clamped" in out
    written = symusic.Score(str(tmp_path / "out" / "out.mid"))
    assert grid_notes_of(written, 8) == {(0, 60, 4), (4, 64, 64)}
    assert round(written.tempos[0].qpm) == 72
    assert [(t.numerator, t.denominator) for t in written.time_signatures] == [(3, 4)]
    assert main(["roundtrip", str(source), "-o", str(tmp_path / "kept.mid"), "--max-duration", "64", "--keep-unisons", "--single-stream"]) == 0
    assert "3 notes in, 3 out" in capsys.readouterr().out
    assert grid_notes_of(symusic.Score(str(tmp_path / "kept.mid")), 8) == {(0, 60, 4), (0, 60, 2), (4, 64, 64)}


TRUNCATED = b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk\x00\x00\x01"


def test_roundtrip_on_a_bad_file_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mid"
    bad.write_bytes(TRUNCATED)
    result = run_cli("roundtrip", str(bad), "-o", str(tmp_path / "out.mid"), "--single-stream")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"midigen roundtrip: error: {bad}: malformed MIDI: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.mid").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file (0 bytes)"), (b"hello, I am text\n", "not a MIDI file (no MThd header)"), (None, "no such file"),
     ("folder", "is a folder, not a MIDI file")],
)
def test_roundtrip_names_the_file_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str | None, reason: str
) -> None:
    bad = tmp_path / "bad.mid"
    if content == "folder":
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    assert main(["roundtrip", str(bad), "-o", str(tmp_path / "out.mid"), "--single-stream"]) == 2
    assert capsys.readouterr().err == f"midigen roundtrip: error: {bad}: {reason}\n"


def test_roundtrip_to_an_unwritable_output_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_score(tmp_path / "in.mid", make_score([[(0, 60, 4)]]))
    (tmp_path / "taken.mid").mkdir()
    assert main(["roundtrip", str(source), "-o", str(tmp_path / "taken.mid"), "--single-stream"]) == 2
    assert capsys.readouterr().err.startswith(f"midigen roundtrip: error: {tmp_path / 'taken.mid'}: cannot write: ")


def test_roundtrip_survives_a_parser_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def crash(path: str) -> sandbox.ParsedFile:
        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("unreachable")

    source = write_score(tmp_path / "in.mid", make_score([[(0, 60, 4)]]))
    monkeypatch.setattr(sandbox, "parse_one", crash)
    assert main(["roundtrip", str(source), "-o", str(tmp_path / "out.mid"), "--single-stream"]) == 2
    assert capsys.readouterr().err == f"midigen roundtrip: error: {source}: parser crashed: SIGSEGV\n"
