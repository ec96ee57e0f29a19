"""The bundled corpus export: real music21 scores → MIDI files, cached, deterministic, with a split."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import symusic

from midigen.cli.main import main
from midigen.codec import SeedTokenizer
from midigen.data import corpus as corpus_module
from midigen.data.corpus import (
    CORPORA,
    CorpusReport,
    Piece,
    corpus_root,
    export_corpus,
    export_piece,
    list_pieces,
    program_of_name,
    select_pieces,
)
from midigen.data.splits import split_of
from midigen.errors import MidigenError

FIRST_CHORALES = 3
FAILING_TUNE = "airdsAirs_book2_355"  # music21: "badly formed repeats"
GOOD_TUNES = ["essenFolksong_han1_1", "essenFolksong_han1_2"]
QUARTET = ["Violin I", "Violin II", "Viola", "Cello"]
# music21 gives every part of these String Ensemble 1 (Haydn, Mozart) or swaps the violins and the cello (Beethoven)
CHAMBER_PIECES = {
    "haydn_opus1no1_movement2": (QUARTET, [40, 40, 41, 42]),
    "mozart_k80_movement3": (QUARTET, [40, 40, 41, 42]),
    "beethoven_opus18no1_movement4": (QUARTET, [40, 40, 41, 42]),
    "corelli_opus3no1_1grave": (["Violino I.", "Violino II.", "Violone e Organo"], [40, 40, 43]),
}
FAILING_QUARTET = "beethoven_opus132"  # music21: "badly formed repeats"


@pytest.fixture(scope="module")
def chorales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "chorales"
    export_corpus("bach-chorales", out, workers=2, limit=FIRST_CHORALES, progress=False)
    return out


@pytest.fixture(scope="module")
def folk_names() -> set[str]:
    return {piece.name for piece in list_pieces("folk")}


@pytest.fixture(scope="module")
def chamber(tmp_path_factory: pytest.TempPathFactory) -> CorpusReport:
    out = tmp_path_factory.mktemp("corpus") / "chamber"
    return export_corpus("chamber", out, workers=2, names=[*CHAMBER_PIECES, FAILING_QUARTET], progress=False)


def midi_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.mid"))}


def test_chorales_export_as_multitrack_midi_the_codec_reads(chorales: Path) -> None:
    expected = [piece.file_name for piece in list_pieces("bach-chorales")[:FIRST_CHORALES]]
    assert sorted(midi_files(chorales)) == sorted(expected)
    for name in expected:
        score = symusic.Score(str(chorales / name))
        assert [track.name for track in score.tracks] == ["Soprano", "Alto", "Tenor", "Bass"]
        assert [track.program for track in score.tracks] == [52] * 4  # voices: Choir Aahs
        assert all(track.note_num() > 0 for track in score.tracks)
        assert len(SeedTokenizer().encode(chorales / name)) > 100


def test_pickup_is_padded_so_bar_lines_fall_on_the_midi_bar_grid(chorales: Path) -> None:
    from music21 import converter

    source = corpus_root() / "bach/bwv269.mxl"  # 3/4, one-beat pickup, repeats
    score = symusic.Score(str(chorales / "bach_bwv269.mid"))
    tpq = score.ticks_per_quarter
    assert [(ts.time, ts.numerator, ts.denominator) for ts in score.time_signatures] == [(0, 3, 4)]
    assert min(track.notes[0].time for track in score.tracks) == 2 * tpq
    # every full bar of the score, repeats expanded, starts on a multiple of 3 quarter notes in the MIDI
    bars = converter.parse(source).parts[0].expandRepeats().getElementsByClass("Measure")
    full_bars = [bar for bar in bars if bar.duration.quarterLength == 3]
    assert len(full_bars) > 20
    assert all((bar.offset + 2) % 3 == 0 for bar in full_bars)
    assert score.end() > full_bars[-1].offset * tpq


def test_rerun_is_cached_and_leaves_files_untouched(chorales: Path) -> None:
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in chorales.glob("*.mid")}
    report = export_corpus("bach-chorales", chorales, workers=2, limit=FIRST_CHORALES, progress=False)
    assert report.exported == [] and report.failed == []
    assert report.cached == [piece.name for piece in list_pieces("bach-chorales")[:FIRST_CHORALES]]
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in chorales.glob("*.mid")} == before


def test_export_is_deterministic(chorales: Path, tmp_path: Path) -> None:
    report = export_corpus("bach-chorales", tmp_path, workers=1, limit=FIRST_CHORALES, progress=False)
    assert report.exported == [piece.name for piece in list_pieces("bach-chorales")[:FIRST_CHORALES]]
    assert report.paths == [tmp_path / f"{name}.mid" for name in report.exported]
    assert midi_files(tmp_path) == midi_files(chorales)
    for index in ("splits.json", "manifest.json"):
        assert (tmp_path / index).read_bytes() == (chorales / index).read_bytes()


def test_splits_and_manifest_describe_the_folder(chorales: Path) -> None:
    splits = json.loads((chorales / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    assert sorted(name for names in splits.values() for name in names) == sorted(midi_files(chorales))
    assert all(split_of(name) == split for split, names in splits.items() for name in names)
    manifest = json.loads((chorales / "manifest.json").read_text())
    assert manifest["corpus"] == "bach-chorales" and manifest["failed"] == []
    for entry in manifest["pieces"]:
        assert (corpus_root() / entry["source"]).is_file()
        assert entry["split"] == split_of(entry["file"])


def test_listed_corpora_hold_each_work_once_preferring_musicxml() -> None:
    chorales = list_pieces("bach-chorales")
    assert len(chorales) == len({piece.name for piece in chorales}) == 350  # music21 lists 21 of 371 twice
    assert all((corpus_root() / piece.source).is_file() for piece in chorales)
    quartets = list_pieces("beethoven-quartets")
    assert len(quartets) == len({piece.name for piece in quartets}) == 22
    assert "beethoven/opus18no1/movement1.mxl" in [piece.source for piece in quartets]


def test_chamber_gathers_the_multi_instrument_works_of_several_composers() -> None:
    pieces = list_pieces("chamber")
    assert len(pieces) == len({piece.name for piece in pieces}) == 86
    assert all((corpus_root() / piece.source).is_file() for piece in pieces)
    composers = {piece.source.split("/")[0] for piece in pieces}
    assert {"haydn", "mozart", "beethoven", "schumann_robert", "corelli", "bach", "weber"} <= composers
    sources = {piece.source for piece in pieces}
    assert {piece.source for piece in list_pieces("beethoven-quartets")} <= sources  # all 22 Beethoven quartets
    assert not sources & {piece.source for piece in list_pieces("bach-chorales")}  # no chorale twice
    assert "mozart/k545/movement1_exposition.mxl" not in sources  # a piano sonata: one instrument
    assert set(CHAMBER_PIECES) <= {piece.name for piece in pieces}


def test_chamber_parts_keep_their_instruments_as_general_midi_programs(chamber: CorpusReport) -> None:
    assert sorted(chamber.exported) == sorted(CHAMBER_PIECES)
    assert sorted(midi_files(chamber.out_dir)) == sorted(f"{name}.mid" for name in CHAMBER_PIECES)
    for name, (track_names, programs) in CHAMBER_PIECES.items():
        score = symusic.Score(str(chamber.out_dir / f"{name}.mid"))
        assert [track.name for track in score.tracks] == track_names, name
        assert [track.program for track in score.tracks] == programs, name
        assert not any(track.is_drum for track in score.tracks)
        assert all(track.note_num() > 50 for track in score.tracks)
    assert len(SeedTokenizer().encode(chamber.out_dir / "haydn_opus1no1_movement2.mid")) > 100


def test_chamber_piece_music21_cannot_write_is_skipped_and_reported(chamber: CorpusReport) -> None:
    assert [name for name, _ in chamber.failed] == [FAILING_QUARTET]
    assert chamber.failed[0][1].startswith("ExpanderException: cannot expand Stream")
    manifest = json.loads(chamber.manifest_path.read_text())
    assert manifest["corpus"] == "chamber"
    assert [entry["name"] for entry in manifest["pieces"]] == sorted(CHAMBER_PIECES)
    assert manifest["failed"] == [
        {"name": FAILING_QUARTET, "source": "beethoven/opus132.mxl", "reason": chamber.failed[0][1]}
    ]


def test_instrument_names_map_to_general_midi_programs() -> None:
    expected = {
        "1st Violin": 40, "Violino II.": 40, "Viola.": 41, "Violoncello.": 42, "Violone e Organo": 43,
        "Flöte": 73, "Oboe 1": 68, "Bb Clarinet": 71, "Klarinette": 71, "Fagotto": 70, "Horn 2": 60,
        "Corno": 60, "Corno inglese": 69, "Trumpet 1": 56, "Trombone": 57, "Tuba": 58, "Timpani": 47,
        "Harp": 46, "Piano": 0, "Organ": 19, "Cembalo": 6, "Soprano I": 52, "Gesang": 52, "Bass": 52,
        "Basso continuo": 42, "Continuo": 42,
    }
    assert {name: program_of_name(name) for name in expected} == expected
    assert program_of_name("MusicXML Part") is None  # left to the instrument's name or music21's program


def test_percussion_parts_go_to_drum_tracks(tmp_path: Path) -> None:
    # the corpora have no percussion; music21's demo has a drum kit and a cowbell
    assert export_piece(Piece("demos_drum_sample", "demos/drum_sample.xml"), tmp_path) is None
    score = symusic.Score(str(tmp_path / "demos_drum_sample.mid"))
    assert [(track.name, track.is_drum) for track in score.tracks] == [("Drums", True), ("Cowbell", True)]


def test_folk_is_one_piece_per_tune(folk_names: set[str], tmp_path: Path) -> None:
    assert not any(name.startswith("josquin") for name in folk_names)  # voices of polyphony, not tunes
    report = export_corpus("folk", tmp_path, workers=2, names=GOOD_TUNES, progress=False)
    assert report.exported == GOOD_TUNES
    first, second = (symusic.Score(str(path)) for path in report.paths)
    assert len(first.tracks) == len(second.tracks) == 1
    assert first.tracks[0].notes.numpy()["pitch"].tolist() != second.tracks[0].notes.numpy()["pitch"].tolist()


def test_tune_that_returns_to_its_metre_keeps_every_time_signature(tmp_path: Path) -> None:
    # music21's ABC reader shares one 4/4 object between bar 1 and the bar after an irregular 2/4 bar
    report = export_corpus("folk", tmp_path, workers=1, names=["essenFolksong_han1_56"], progress=False)
    assert report.failed == []
    score = symusic.Score(str(report.paths[0]))
    tpq = score.ticks_per_quarter
    assert [(ts.time / tpq, ts.numerator, ts.denominator) for ts in score.time_signatures] == [
        (0, 4, 4),
        (56, 2, 4),
        (58, 4, 4),
    ]


def test_failing_piece_is_reported_and_recorded_not_fatal(folk_names: set[str], tmp_path: Path) -> None:
    assert FAILING_TUNE in folk_names
    names = [FAILING_TUNE, GOOD_TUNES[0]]
    report = export_corpus("folk", tmp_path, workers=2, names=names, progress=False)
    assert report.exported == [GOOD_TUNES[0]]
    assert [name for name, _ in report.failed] == [FAILING_TUNE]
    assert report.failed[0][1].startswith("ExpanderException: cannot expand Stream")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(entry["name"], entry["tune"]) for entry in manifest["failed"]] == [(FAILING_TUNE, 355)]

    rerun = export_corpus("folk", tmp_path, workers=2, names=names, progress=False)
    assert rerun.failed == [] and rerun.failed_before == report.failed and rerun.cached == [GOOD_TUNES[0]]
    retried = export_corpus("folk", tmp_path, workers=2, names=names, retry_failed=True, progress=False)
    assert retried.failed == report.failed


def test_known_bad_chorale_source_is_a_one_line_reason(tmp_path: Path) -> None:
    # music21's Humdrum copy of bwv277 (the export uses its MusicXML copy) has unreadable repeats
    reason = export_piece(Piece("bach_bwv277", "bach/bwv277.krn"), tmp_path)
    assert reason is not None and reason.startswith("ExpanderException:") and "\n" not in reason
    assert list(tmp_path.iterdir()) == []


def test_piece_over_its_time_is_killed_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real piece can beat any short limit on a fast machine; one that hangs cannot (forked workers inherit it)
    monkeypatch.setattr(corpus_module, "piece_midi", lambda piece: time.sleep(60))
    report = export_corpus("bach-chorales", tmp_path, workers=2, limit=2, timeout_s=0.5, progress=False)
    assert [reason for _, reason in report.failed] == ["timed out after 0.5 s"] * 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json", "splits.json"]  # no temp files
    monkeypatch.undo()
    retried = export_corpus("bach-chorales", tmp_path, workers=2, limit=2, retry_failed=True, progress=False)
    assert len(retried.exported) == 2 and retried.failed == []
    assert json.loads((tmp_path / "manifest.json").read_text())["failed"] == []


def test_temp_file_of_an_interrupted_export_is_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".bach_bwv269.mid.k2j4x9.tmp"  # the name `atomic_path` gives a temporary file
    leftover.write_bytes(b"MThd half written")
    report = export_corpus("bach-chorales", tmp_path, workers=1, limit=1, progress=False)
    assert report.exported == ["bach_bwv269"] and not leftover.exists()


def test_help_lists_every_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["corpus", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "chamber" in CORPORA and f"({', '.join(CORPORA)})" in help_text


def test_unknown_corpus_names_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MidigenError, match=", ".join(CORPORA)):
        export_corpus("mozart", tmp_path)
    assert main(["corpus", "mozart", "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "bach-chorales" in error


def test_selection_errors() -> None:
    pieces = list_pieces("bach-chorales")
    assert select_pieces(pieces, "bach-chorales", None, 2) == pieces[:2]
    with pytest.raises(MidigenError, match="no piece named bwv269"):
        select_pieces(pieces, "bach-chorales", ["bwv269"], None)
    with pytest.raises(MidigenError, match="at least 1"):
        select_pieces(pieces, "bach-chorales", None, 0)


def test_folder_of_another_corpus_is_refused(chorales: Path) -> None:
    with pytest.raises(MidigenError, match="holds the bach-chorales corpus"):
        export_corpus("palestrina", chorales, limit=1, progress=False)


def test_cli_exports_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["corpus", "folk", "-o", str(tmp_path), "--workers", "2", "--quiet"]
    assert main([*args, "--piece", FAILING_TUNE, "--piece", GOOD_TUNES[1]]) == 0
    out = capsys.readouterr().out
    assert f"failed {FAILING_TUNE}: ExpanderException" in out
    assert f"1 exported, 0 already there, 1 failed; splits in {tmp_path / 'splits.json'}" in out
    assert main([*args, "--piece", FAILING_TUNE]) == 2  # nothing selected could be exported
    assert "failed before, not retried" in capsys.readouterr().out
