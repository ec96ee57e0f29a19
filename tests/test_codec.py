"""The seed's encoding: vocabulary, quantisation, the three scores, decoding, and round trips on
synthetic edge cases and on real multi-track files."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import SINGLE_STREAM
from midi_factory import (
    DRUM_CHANNEL,
    GridNote,
    grid_note_counts,
    grid_notes_of,
    make_score,
    tick_notes,
    type0_midi,
    write_score,
)

from midigen.codec import (
    GAP,
    SeedTokenizer,
    TokenizerConfig,
    TokenSequence,
    Vocab,
    load_tokenizer,
    read_notes,
    show_position_score,
    show_sparse_score,
)
from midigen.codec.midi_io import NoteTable
from midigen.errors import BadMidiError, MidigenError

BUNDLED = (("bach-chorales", 3), ("palestrina", 2), ("folk", 3))  # the first pieces of each bundled corpus


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real multi-part pieces from the bundled corpora, exported to MIDI as `midigen corpus` does."""
    from midigen.data.corpus import export_corpus

    folder = tmp_path_factory.mktemp("corpora")
    paths = []
    for corpus, limit in BUNDLED:
        report = export_corpus(corpus, folder / corpus, workers=1, limit=limit, progress=False)
        assert len(report.paths) == limit, report.failed
        paths += report.paths
    return paths


def note_table(ticks_per_quarter: int, onsets: list[int], durations: list[int], pitches: list[int],
               path: str | None = None) -> NoteTable:
    """A one-track piano `NoteTable` of the given notes, without time signatures or tempos."""
    count = len(onsets)
    return NoteTable(ticks_per_quarter, np.array(onsets, dtype=np.int64), np.array(durations, dtype=np.int64),
                     np.array(pitches, dtype=np.int64), np.full(count, 90, dtype=np.int64), np.zeros(count, dtype=np.int64),
                     np.zeros(count, dtype=bool), np.zeros(count, dtype=np.int64), ["piano"], time_signatures=[],
                     tempos=[], path=path)


def roundtrip(tokenizer: SeedTokenizer, source: object) -> set[GridNote]:
    """Encode, decode, write as a MIDI file, and read its notes back on the grid (independently of midigen)."""
    decoded = tokenizer.decode(tokenizer.encode(source))  # type: ignore[arg-type]
    return grid_notes_of(symusic.Score.from_midi(decoded.dumps_midi()), tokenizer.config.steps_per_quarter)


# ---- vocabulary and config ----------------------------------------------------------------------
def test_vocabulary_layout() -> None:
    vocab = replace(SINGLE_STREAM, max_duration=16).vocab
    names = vocab.names()
    assert names[:4] == ["<pad>", "<sos>", "<eos>", "<sep>"]
    assert names[vocab.note(0)] == "n0" and names[vocab.note(127)] == "n127"
    assert names[vocab.duration(1)] == "d1" and names[vocab.duration(16)] == "d16"
    assert vocab.size == len(names) == 4 + 128 + 16
    assert vocab.duration(1) == vocab.note(127) + 1 and vocab.note(0) == Vocab.SEP + 1
    assert [vocab.is_note(t) for t in (3, 4, 131, 132)] == [False, True, True, False]
    assert [vocab.is_duration(t) for t in (131, 132, 147, 148)] == [False, True, True, False]


def test_config_saves_and_loads_equal(tmp_path: Path) -> None:
    config = TokenizerConfig(steps_per_quarter=12, max_duration=96, max_bar_quarters=6, keep_drums=True, tempo_qpm=90.5,
                             merge_unisons=False)
    config.save(tmp_path / "tokenizer.json")
    assert TokenizerConfig.load(tmp_path / "tokenizer.json") == config
    assert config.beat_positions == 72


@pytest.mark.parametrize(
    "bad",
    [
        {"steps_per_quarter": 0},
        {"max_duration": 0},
        {"max_duration": 2**16},  # vocabulary beyond uint16
        {"max_bar_quarters": 0},
        {"steps_per_quarter": 1024, "max_bar_quarters": 100},  # positions beyond uint16
        {"tempo_qpm": 0},
    ],
)
def test_config_rejects_impossible_values(bad: dict[str, int]) -> None:
    with pytest.raises(MidigenError):
        TokenizerConfig(**bad)  # type: ignore[arg-type]


# ---- the three scores, by hand ------------------------------------------------------------------
SMALL = [(0, 64, 4), (0, 60, 4), (4, 67, 8), (20, 72, 2)]


def test_sparse_score_quantises_sorts_and_merges() -> None:
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, max_duration=32))
    # 480 ticks per quarter, 60 per step: ticks 29 → step 0, 30 → step 1 (halves round up)
    score = make_score([[]], ticks_per_step=60)
    notes = [(29, 50, 100), (30, 52, 5), (60, 60, 120), (60, 60, 240), (60, 60, 180), (600, 70, 60 * 1000)]
    score.tracks[0].notes = tick_notes(notes)
    sparse = tokenizer.sparse_score(score)
    # step 0: pitch 50 lasting 2 steps (ends at tick 129 → step 2); step 1: pitch 52 too short → 1 step;
    # step 1: three pitch-60 notes merged, the longest (240 ticks = 4 steps) wins; step 10: clamped to 32
    assert list(zip(sparse.steps.tolist(), sparse.pitches.tolist(), sparse.durations.tolist())) == [
        (0, 50, 2), (1, 60, 4), (1, 52, 1), (10, 70, 32)
    ]
    assert (sparse.merged_notes, sparse.clamped_notes) == (2, 1)
    dense = sparse.to_dense()
    assert dense.shape == (42, 128) and dense[1, 60] == 4 and dense[10, 70] == 32 and np.count_nonzero(dense) == 4


def test_position_and_index_scores_by_hand() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    sparse = tokenizer.sparse_score(make_score([SMALL], time_signatures=[(0, 3, 4)]))
    position = tokenizer.position_score(sparse)
    # simultaneous notes highest first; a gap row (GAP, gap length, step where the gap starts) before each new group
    assert position.rows.tolist() == [
        [64, 4, 0], [60, 4, 0], [GAP, 4, 0], [67, 8, 4], [GAP, 16, 4], [72, 2, 20]
    ]
    sequence = tokenizer.index_score(position)
    assert tokenizer.vocab.describe(sequence.tokens) == [
        "<sos>", "n64", "d4", "n60", "d4", "<sep>", "d4", "n67", "d8", "<sep>", "d16", "n72", "d2", "<eos>"
    ]
    # a <sep> sits where its gap starts, the gap's duration token where it ends
    assert sequence.steps.tolist() == [0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 20, 20, 20, 20]
    assert sequence.bars.tolist() == [0] * 14
    assert sequence.beats.tolist() == sequence.steps.tolist()  # all inside the first 3/4 bar (24 steps)
    np.testing.assert_array_equal(tokenizer.encode(make_score([SMALL], time_signatures=[(0, 3, 4)])).tokens, sequence.tokens)


def test_a_late_first_note_and_long_gaps() -> None:
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, max_duration=16))
    sequence = tokenizer.encode(make_score([[(40, 60, 1), (41, 61, 50)]]))
    # gap of 40 from the start = 16 + 16 + 8; the 50-step note is clamped to 16
    assert tokenizer.vocab.describe(sequence.tokens) == [
        "<sos>", "<sep>", "d16", "<sep>", "d16", "<sep>", "d8", "n60", "d1", "<sep>", "d1", "n61", "d16", "<eos>"
    ]
    assert sequence.steps.tolist() == [0, 0, 16, 16, 32, 32, 40, 40, 40, 40, 41, 41, 41, 41]


def test_token_steps_can_continue_from_any_token() -> None:
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, max_duration=16))
    sequence = tokenizer.encode(make_score([[(0, 60, 4), (3, 62, 2), (40, 64, 8), (70, 65, 1)]]))
    for cut in range(1, len(sequence)):
        rest = tokenizer.token_steps(
            sequence.tokens[cut:], start_step=int(sequence.steps[cut - 1]), after_sep=sequence.tokens[cut - 1] == Vocab.SEP
        )
        np.testing.assert_array_equal(rest, sequence.steps[cut:])


@pytest.mark.parametrize("max_duration", [256, 8])  # 8: long gaps are split into several `<sep> d` pairs
def test_encoded_steps_are_those_the_tokens_imply(prompt_files: list[Path], corpus_files: list[Path],
                                                  max_duration: int) -> None:
    """`index_score` takes each token's step from the position score; `token_steps` (which generation
    uses) derives it from the tokens alone: the two must agree."""
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, max_duration=max_duration))
    for path in prompt_files + corpus_files:
        sequence = tokenizer.encode(path)
        np.testing.assert_array_equal(sequence.steps, tokenizer.token_steps(sequence.tokens), err_msg=str(path))


@pytest.mark.parametrize("config", [SINGLE_STREAM, replace(SINGLE_STREAM, merge_unisons=False),
                                    replace(SINGLE_STREAM, steps_per_quarter=4, max_duration=8)])
def test_files_encoded_together_equal_files_encoded_alone(prompt_files: list[Path], corpus_files: list[Path],
                                                          config: TokenizerConfig) -> None:
    """`sparse_scores` and `index_scores` (what `encode` workers use) sort and lay out many songs at once:
    each song must come out as `encode` makes it alone, its counts of merged and clamped notes too."""
    tokenizer = load_tokenizer(config)
    files = [read_notes(path) for path in prompt_files + corpus_files]
    files.insert(3, note_table(480, [], [], []))  # no notes
    together = tokenizer.sparse_scores(files)
    sequences = tokenizer.index_scores(together)
    assert len(together) == len(sequences) == len(files)
    for notes, sparse, sequence in zip(files, together, sequences):
        alone = tokenizer.sparse_score(notes)
        assert (sparse.merged_notes, sparse.clamped_notes) == (alone.merged_notes, alone.clamped_notes)
        assert sparse.notes() == alone.notes() and sparse.grid.changes == alone.grid.changes
        expected = tokenizer.encode(notes)
        for name in ("tokens", "steps", "bars", "beats"):
            np.testing.assert_array_equal(getattr(sequence, name), getattr(expected, name), err_msg=f"{notes.path}: {name}")
    assert sequences[3].tokens.tolist() == [Vocab.SOS, Vocab.EOS]
    assert tokenizer.sparse_scores([]) == tokenizer.index_scores([]) == []
    late = note_table(1, [0, 2**23], [1, 1], [60, 62], path="late.mid")
    with pytest.raises(BadMidiError, match="^late.mid: timing out of range"):
        tokenizer.sparse_scores([files[0], late, *files[1:]])
    # the songs have unisons to merge and (at 8 steps at most) notes to clamp: their counts were checked
    assert any(s.merged_notes for s in together) == config.merge_unisons
    assert any(s.clamped_notes for s in together) == (config.max_duration == 8)


def test_inspection_helpers_render_the_scores() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    sparse = tokenizer.sparse_score(make_score([SMALL], time_signatures=[(0, 3, 4)]))
    lines = show_sparse_score(sparse, first_step=0, num_steps=24).splitlines()
    assert lines[0].split() == ["step", "bar:beat", "C5", "G4", "E4", "C4"]
    assert lines[1].split() == ["0", "0:0", ".", ".", "4", "4"]
    assert lines[5].split() == ["4", "0:4", ".", "8", ".", "."]
    assert lines[21].split() == ["20", "0:20", "2", ".", ".", "."]
    assert len(lines) == 25
    table = show_position_score(tokenizer.position_score(sparse), max_rows=5).splitlines()
    assert table[3].split() == ["2", "0", "0:0", "gap", "4"]
    assert table[4].split() == ["3", "4", "0:4", "G4(67)", "8"]
    assert table[-1] == "... 1 more rows"


# ---- decoding -----------------------------------------------------------------------------------
def test_decode_writes_one_track_with_tempo_and_time_signatures() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    source = make_score([SMALL, [(2, 40, 30)]], time_signatures=[(0, 6, 8), (48, 5, 4)], tempos=[(0, 90.0), (24, 150.0)])
    score = tokenizer.decode(tokenizer.encode(source), tempos=[(0, 90.0)])
    assert len(score.tracks) == 1 and score.tracks[0].program == 0 and not score.tracks[0].is_drum
    assert [round(t.qpm, 3) for t in score.tempos] == [90.0]
    ticks_per_step = score.ticks_per_quarter // 8
    assert [(t.time // ticks_per_step, t.numerator, t.denominator) for t in score.time_signatures] == [(0, 6, 8), (48, 5, 4)]
    changing = tokenizer.decode(tokenizer.encode(source), tempos=[(0, 90.0), (24, 150.0)])  # a tempo map is written whole
    assert [(t.time // ticks_per_step, round(t.qpm, 3)) for t in changing.tempos] == [(0, 90.0), (24, 150.0)]


def test_decode_from_positions_alone_recovers_bar_lengths() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    notes = [(step, 60 + step % 12, 2) for step in range(0, 200, 6)]
    encoded = tokenizer.encode(make_score([notes], time_signatures=[(0, 6, 8), (72, 5, 4)]))
    positions_only = TokenSequence(encoded.tokens, encoded.steps, {"bars": encoded.bars, "beats": encoded.beats})  # as a store holds it
    score = tokenizer.decode(positions_only)
    ticks_per_step = score.ticks_per_quarter // 8
    # 6/8 and 3/4 bars are equally long: from positions alone 6/8 comes back as 3/4 (a documented loss)
    assert [(t.time // ticks_per_step, t.numerator, t.denominator) for t in score.time_signatures] == [(0, 3, 4), (72, 5, 4)]
    assert grid_notes_of(score, 8) == set(notes)


def test_decode_skips_specials_drops_an_unfinished_pair_and_merges_repeats() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    v = tokenizer.vocab
    tokens = [Vocab.SOS, v.note(60), v.duration(2), v.note(60), v.duration(5), Vocab.PAD, Vocab.SEP, v.duration(3), v.note(62)]
    sparse = tokenizer.decode_sparse(np.array(tokens))
    assert sparse.notes() == {(0, 60, 5)} and sparse.merged_notes == 1


@pytest.mark.parametrize(
    ("tokens", "message"),
    [([1, 4, 4, 2], "invalid token pair"), ([1, 3, 3, 2], "invalid token pair"), ([1, 4, 9999, 2], "outside the vocabulary")],
)
def test_decode_rejects_malformed_tokens(tokens: list[int], message: str) -> None:
    with pytest.raises(MidigenError, match=message):
        load_tokenizer(SINGLE_STREAM).decode(tokens)


# ---- round trips: synthetic edge cases ----------------------------------------------------------
SYNTHETIC: dict[str, list[list[GridNote]]] = {
    "chords": [[(0, 60, 8), (0, 64, 8), (0, 67, 8), (8, 59, 4), (8, 62, 4), (8, 67, 16), (24, 48, 8), (24, 84, 1)]],
    "repeated pitches": [[(0, 60, 2), (2, 60, 2), (4, 60, 1), (5, 60, 8), (9, 60, 8), (30, 60, 1), (31, 60, 1)]],
    "long notes and gaps": [[(0, 48, 300), (10, 72, 1000), (500, 60, 2), (1900, 61, 40)]],
    "step 0 and extreme pitches": [[(0, 0, 1), (0, 127, 3), (3, 0, 5), (3, 127, 1), (4, 64, 2)]],
    "tracks in parallel": [[(0, 60, 4), (4, 62, 4), (8, 64, 4)], [(0, 48, 12), (12, 43, 4)], [(2, 72, 1), (6, 74, 1)]],
    "late start": [[(100, 60, 4), (104, 62, 4)]],
}
CHANGES = {
    "time_signatures": [(0, 3, 4), (48, 6, 8), (96, 5, 4), (136, 4, 4)],
    "tempos": [(0, 120.0), (30, 90.0), (64, 200.0)],
}


def expected_notes(tracks: list[list[GridNote]], max_duration: int) -> set[GridNote]:
    return {(step, pitch, min(duration, max_duration)) for notes in tracks for step, pitch, duration in notes}


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
@pytest.mark.parametrize("steps_per_quarter", [4, 8, 12])
@pytest.mark.parametrize("max_duration", [16, 256])
@pytest.mark.parametrize("with_changes", [False, True])
def test_synthetic_round_trip_is_exact(case: str, steps_per_quarter: int, max_duration: int, with_changes: bool) -> None:
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, steps_per_quarter=steps_per_quarter, max_duration=max_duration))
    score = make_score(SYNTHETIC[case], steps_per_quarter=steps_per_quarter, **(CHANGES if with_changes else {}))
    assert roundtrip(tokenizer, score) == expected_notes(SYNTHETIC[case], max_duration)


def test_round_trip_through_a_file_with_drums(tmp_path: Path) -> None:
    melody, drums = [(0, 60, 4), (4, 62, 4)], [(0, 36, 1), (0, 42, 1), (2, 42, 1), (4, 38, 1)]
    path = write_score(tmp_path / "band.midi", make_score([melody], drum_tracks=[drums]))
    assert roundtrip(load_tokenizer(SINGLE_STREAM), path) == set(melody)
    assert roundtrip(load_tokenizer(replace(SINGLE_STREAM, keep_drums=True)), path) == set(melody) | set(drums)


def test_same_pitch_same_onset_is_merged_longest_first() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    score = make_score([[(0, 60, 4), (8, 62, 2)], [(0, 60, 8), (8, 62, 2), (8, 64, 1)]])
    sparse = tokenizer.sparse_score(score)
    assert sparse.notes() == {(0, 60, 8), (8, 62, 2), (8, 64, 1)} and sparse.merged_notes == 2
    assert roundtrip(tokenizer, score) == sparse.notes()


def test_unisons_can_be_kept_apart() -> None:
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, merge_unisons=False))
    score = make_score([[(0, 60, 4), (8, 62, 2)], [(0, 60, 8), (8, 62, 2), (8, 64, 1)]])
    sparse = tokenizer.sparse_score(score)
    assert list(zip(sparse.steps.tolist(), sparse.pitches.tolist(), sparse.durations.tolist())) == [
        (0, 60, 8), (0, 60, 4), (8, 64, 1), (8, 62, 2), (8, 62, 2)  # longest first within a unison
    ] and sparse.merged_notes == 0
    assert sparse.to_dense()[0, 60] == 8  # the seed's matrix holds one note per cell: the longest
    sequence = tokenizer.encode(score)
    assert tokenizer.vocab.describe(sequence.tokens[:5]) == ["<sos>", "n60", "d8", "n60", "d4"]
    decoded = tokenizer.decode(sequence)
    assert [len(track.notes) for track in decoded.tracks] == [3, 2]  # the second of each unison on its own track
    assert grid_note_counts(symusic.Score.from_midi(decoded.dumps_midi()), 8) == grid_note_counts(score, 8)
    # a tokenizer that merges reads the same tokens as two notes fewer
    assert load_tokenizer(SINGLE_STREAM).decode_sparse(sequence.tokens).merged_notes == 2


@pytest.mark.parametrize("ticks_per_quarter", [1, 96, 100, 384, 480, 960, 10080])
def test_any_ticks_per_quarter(ticks_per_quarter: int) -> None:
    score = symusic.Score(ticks_per_quarter)
    track = symusic.Track("t")
    track.notes = tick_notes([(0, 60, ticks_per_quarter), (ticks_per_quarter // 2, 64, ticks_per_quarter * 3), (ticks_per_quarter * 5, 67, 1)])
    score.tracks.append(track)
    tokenizer = load_tokenizer(SINGLE_STREAM)
    assert roundtrip(tokenizer, score) == grid_notes_of(score, 8)


def test_type_0_file_with_drums_on_channel_10(tmp_path: Path) -> None:
    tpq = 96  # 12 ticks per step
    notes = [(0, 60, 48, 0), (0, 48, 96, 1), (48, 62, 48, 0), (0, 36, 12, DRUM_CHANNEL), (48, 38, 12, DRUM_CHANNEL)]
    path = tmp_path / "type0.mid"
    path.write_bytes(type0_midi(notes, tpq, numerator=3, denominator=4))
    assert symusic.Score(str(path)).tracks  # symusic reads it
    tokenizer = load_tokenizer(SINGLE_STREAM)
    sequence = tokenizer.encode(path)
    assert grid_notes_of(tokenizer.decode(sequence), 8) == {(0, 60, 4), (0, 48, 8), (4, 62, 4)}
    kept = load_tokenizer(replace(SINGLE_STREAM, keep_drums=True))
    assert grid_notes_of(kept.decode(kept.encode(path)), 8) == {(0, 60, 4), (0, 48, 8), (4, 62, 4), (0, 36, 1), (4, 38, 1)}
    assert sequence.grid is not None and [(c.numerator, c.denominator) for c in sequence.grid.time_signatures()] == [(3, 4)]


def test_every_kind_of_source_encodes_the_same(tmp_path: Path) -> None:
    score = make_score(SYNTHETIC["chords"])
    path = write_score(tmp_path / "chords.mid", score)
    tokenizer = load_tokenizer(SINGLE_STREAM)
    reference = tokenizer.encode(path).tokens
    for source in (str(path), path.read_bytes(), score, read_notes(path)):
        np.testing.assert_array_equal(tokenizer.encode(source).tokens, reference)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tracks", "drums", "reason"),
    [([], [], "no notes"), ([], [[(0, 36, 1)]], "only drum notes"), ([[(2**25, 60, 1)]], [], "timing out of range")],
)
def test_unusable_scores_name_the_file(tmp_path: Path, tracks: list, drums: list, reason: str) -> None:
    path = write_score(tmp_path / "bad.mid", make_score(tracks or [[]], ticks_per_step=1, drum_tracks=drums))
    with pytest.raises(BadMidiError, match=reason) as caught:
        load_tokenizer(SINGLE_STREAM).encode(path)
    assert str(path) in str(caught.value)


def test_zero_ticks_per_quarter_is_a_bad_file(tmp_path: Path) -> None:
    data = bytearray(type0_midi([(0, 60, 96, 0)], 96))
    data[12:14] = b"\x00\x00"  # the header's division field
    path = tmp_path / "zero.mid"
    path.write_bytes(bytes(data))
    with pytest.raises(BadMidiError, match="0 ticks per quarter"):
        load_tokenizer(SINGLE_STREAM).encode(path)


def test_empty_scores_pass_through_every_stage() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    sparse = tokenizer.decode_sparse(np.array([Vocab.SOS, Vocab.EOS]))
    assert len(sparse) == 0 and sparse.to_dense().shape == (0, 128)
    assert tokenizer.position_score(sparse).rows.shape == (0, 3)
    assert tokenizer.index_score(tokenizer.position_score(sparse)).tokens.tolist() == [Vocab.SOS, Vocab.EOS]
    assert tokenizer.decode([Vocab.SOS, Vocab.EOS]).note_num() == 0
    assert show_sparse_score(sparse) == "(empty score)"


def test_overlapping_notes_of_one_pitch_survive_a_midi_file() -> None:
    """A note that starts while another of its pitch sounds goes to a track of its own: in one track a
    reader would pair the note-offs with the wrong notes."""
    notes = [(0, 60, 16), (4, 60, 4), (6, 60, 20), (16, 60, 2), (30, 64, 8), (32, 64, 8)]  # A B C D E F
    tokenizer = load_tokenizer(SINGLE_STREAM)
    score = tokenizer.decode(tokenizer.encode(make_score([notes])))
    assert [track.note_num() for track in score.tracks] == [3, 2, 1]  # 60: A, D | B | C; 64: E | F
    assert len({track.program for track in score.tracks}) == 1
    assert roundtrip(tokenizer, make_score([notes])) == set(notes)


# ---- round trips: real files --------------------------------------------------------------------
def assert_only_merges_are_lost(path: Path, steps_per_quarter: int) -> float:
    """Every quantised note comes back identical unless a longer note shares its onset and pitch
    (the documented merge); returns the share of notes that came back."""
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, steps_per_quarter=steps_per_quarter))
    expected = {(s, p, min(d, 256)) for s, p, d in grid_notes_of(symusic.Score(str(path)), steps_per_quarter)}
    back = roundtrip(tokenizer, path)
    assert back <= expected, "the round trip invented notes"
    kept_duration = {(s, p): d for s, p, d in back}
    lost = expected - back
    assert all(kept_duration.get((s, p), 0) > d for s, p, d in lost), "a note was lost without being merged"
    slots = Counter((s, p) for s, p, _ in expected)
    unmerged = {n for n in expected if slots[n[0], n[1]] == 1}
    assert unmerged <= back
    return len(expected & back) / len(expected)


@pytest.mark.parametrize("steps_per_quarter", [4, 8, 12])
def test_real_prompts_lose_only_merged_notes(prompt_files: list[Path], steps_per_quarter: int) -> None:
    for path in prompt_files:
        assert_only_merges_are_lost(path, steps_per_quarter)


def test_bundled_corpora_lose_only_merged_notes(corpus_files: list[Path]) -> None:
    for path in corpus_files:
        assert_only_merges_are_lost(path, 8)


@pytest.mark.parametrize("steps_per_quarter", [4, 8])
def test_with_unisons_kept_every_note_of_real_files_comes_back(prompt_files: list[Path], corpus_files: list[Path],
                                                               steps_per_quarter: int) -> None:
    """Every note on the grid, as often as the file has it, comes back identical (durations clamped to 256)."""
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, steps_per_quarter=steps_per_quarter, merge_unisons=False))
    unisons = 0
    for path in prompt_files + corpus_files:
        expected: Counter[GridNote] = Counter()
        for (step, pitch, duration), count in grid_note_counts(symusic.Score(str(path)), steps_per_quarter).items():
            expected[step, pitch, min(duration, 256)] += count
        decoded = tokenizer.decode(tokenizer.encode(path))
        assert grid_note_counts(symusic.Score.from_midi(decoded.dumps_midi()), steps_per_quarter) == expected, path
        unisons += len(expected) - len({(s, p) for s, p, _ in expected})
    assert unisons > 0  # the files do hold unisons of different lengths, which the default merges
