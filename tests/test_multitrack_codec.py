"""The multi-track seed codec (`midigen.codec.multitrack`) on real files and built scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

from midigen.codec.config import TokenizerConfig
from midigen.codec.instruments import GM_FAMILIES, GM_NAMES, parse_instruments
from midigen.codec.midi_io import DRUM_INSTRUMENT, read_notes
from midigen.codec.multitrack import (
    DEFAULT_VELOCITY,
    bin_velocities,
    decode_multitrack,
    encode_multitrack,
    instrument_feature,
    multitrack_score,
    velocity_bins,
)
from midigen.errors import BadMidiError, MidigenError

DATA = Path(__file__).parent / "data"
MULTITRACK = sorted((DATA / "multitrack").glob("*.mid"))
PROMPTS = sorted((DATA / "prompts").glob("*.mid"))
REAL = MULTITRACK + PROMPTS

CONFIGS = {
    "default": TokenizerConfig(),
    "no-velocity": TokenizerConfig(velocity_bins=0),
    "short-durations": TokenizerConfig(max_duration=32, velocity_bins=4),
    "unmerged": TokenizerConfig(merge_unisons=False, velocity_bins=16),
    "no-drums": TokenizerConfig(keep_drums=False),
}


def test_fixtures_are_there() -> None:
    assert [p.name for p in MULTITRACK] == ["230_bpm_multitrack.mid", "beat.mid", "concerto_for_orchestra_1.mid"]
    assert len(PROMPTS) == 19


# ---- an independent reference: plain integer arithmetic per note ---------------------------------
def expected_notes(score: symusic.Score, config: TokenizerConfig) -> dict[tuple[int, int, int], list[tuple[int, int]]]:
    """(onset step, instrument key, pitch) -> [(duration, velocity)] of the notes the codec must keep, longest
    (then loudest) first: with `merge_unisons` only the first of the notes of one instrument; of drum hits always
    only the loudest (duration 0: not compared)."""
    spq, tpq, longest = config.steps_per_quarter, score.ticks_per_quarter, config.max_duration
    slots: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for track in score.tracks:
        key = DRUM_INSTRUMENT if track.is_drum else track.program
        if track.is_drum and not config.keep_drums:
            continue
        for note in track.notes:
            onset = (2 * spq * note.time + tpq) // (2 * tpq)
            end = (2 * spq * (note.time + note.duration) + tpq) // (2 * tpq)
            duration = 0 if track.is_drum else min(max(1, end - onset), longest)
            slots.setdefault((onset, key, note.pitch), []).append((duration, note.velocity))
    kept = {}
    for (onset, key, pitch), notes in slots.items():
        notes.sort(reverse=True)
        kept[(onset, key, pitch)] = notes[:1] if config.merge_unisons or key == DRUM_INSTRUMENT else notes
    return kept


def note_set(expected: dict[tuple[int, int, int], list[tuple[int, int]]]) -> set[tuple[int, int, int, int]]:
    return {(onset, pitch, duration, key) for (onset, key, pitch), notes in expected.items() for duration, _ in notes}


def note_count(expected: dict[tuple[int, int, int], list[tuple[int, int]]]) -> int:
    return sum(len(notes) for notes in expected.values())


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["default", "no-velocity", "short-durations"])
def test_real_files_round_trip(path: Path, name: str) -> None:
    config = CONFIGS[name]
    reference = expected_notes(symusic.Score(str(path)), config)
    expected = note_set(reference)
    table = read_notes(path)
    [song] = encode_multitrack([table], config)
    decoded = decode_multitrack(song.tokens, config)
    actual = decoded.notes()
    share = len(expected & actual) / len(expected)
    assert share >= 0.995, f"{path.name}: {share:.2%} of {len(expected)} notes back"
    assert len(decoded) == note_count(reference)
    if config.velocity_bins:  # each note's velocity: the centre of its original velocity's bin
        bins = config.velocity_bins
        decoded_velocity = dict(zip(zip(decoded.steps.tolist(), decoded.instruments.tolist(), decoded.pitches.tolist()),
                                    decoded.velocities.tolist()))
        slots = list(reference)
        original = np.array([reference[slot][0][1] for slot in slots])
        np.testing.assert_array_equal(np.array([decoded_velocity[slot] for slot in slots]),
                                      bin_velocities(velocity_bins(original, bins), bins))
    assert song.notes == len(table)
    assert len(decoded) == song.notes - song.merged_notes
    # the features of the encoder and the ones derived from the tokens agree
    np.testing.assert_array_equal(instrument_feature(song.tokens, config), song.instruments)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_files_through_a_score(path: Path) -> None:
    """decode -> score -> MIDI bytes -> read -> encode gives the same tokens."""
    config = CONFIGS["default"]
    table = read_notes(path)
    [song] = encode_multitrack([table], config)
    score = multitrack_score(decode_multitrack(song.tokens, config), song.grid, [(0, 100.0)], config)
    [again] = encode_multitrack([read_notes(score.dumps_midi())], config)
    np.testing.assert_array_equal(again.tokens, song.tokens)
    np.testing.assert_array_equal(again.steps, song.steps)
    np.testing.assert_array_equal(again.instruments, song.instruments)


def test_real_files_with_drums_dropped() -> None:
    config = CONFIGS["no-drums"]
    table = read_notes(DATA / "multitrack" / "230_bpm_multitrack.mid")
    [song] = encode_multitrack([table], config)
    assert song.notes == int((~table.drums).sum()) < len(table)
    assert not np.isin(song.tokens, list(config.vocab.ids_of("hit"))).any()
    assert DRUM_INSTRUMENT + 1 not in song.instruments
    with pytest.raises(BadMidiError, match=r"beat\.mid: only drum notes"):
        encode_multitrack([read_notes(DATA / "multitrack" / "beat.mid")], config)


@pytest.mark.parametrize("name", ["default", "unmerged", "short-durations"])
def test_batch_equals_one_at_a_time(name: str) -> None:
    config = CONFIGS[name]
    tables = [read_notes(path) for path in REAL]
    together = encode_multitrack(tables, config)
    assert len(together) == len(tables)
    for table, song in zip(tables, together):
        [alone] = encode_multitrack([table], config)
        for field in ("tokens", "steps", "instruments"):
            np.testing.assert_array_equal(getattr(song, field), getattr(alone, field), err_msg=f"{table.path} {field}")
        assert (song.notes, song.merged_notes, song.clamped_notes) == (alone.notes, alone.merged_notes,
                                                                       alone.clamped_notes)
        assert song.grid is alone.grid or song.grid.time_signatures() == alone.grid.time_signatures()


# ---- synthetic scores: every rule, exactly ----------------------------------------------------------
TPQ = 480
STEP = TPQ // 8  # one step at 8 steps per quarter


def add_notes(track: symusic.Track, notes: list[tuple[int, int, int, int]]) -> None:
    """(onset step, duration steps, pitch, velocity) each."""
    for onset, duration, pitch, velocity in notes:
        track.notes.append(symusic.Note(onset * STEP, duration * STEP, pitch, velocity))


def built_score() -> symusic.Score:
    score = symusic.Score(TPQ)
    score.tempos.append(symusic.Tempo(0, 100.0))
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    score.time_signatures.append(symusic.TimeSignature(32 * STEP, 3, 4))  # bar 2 in 3/4
    score.time_signatures.append(symusic.TimeSignature(80 * STEP, 6, 8))
    piano_a = symusic.Track("piano right", program=0, is_drum=False)
    add_notes(piano_a, [(0, 8, 72, 100), (0, 8, 64, 90), (8, 4, 67, 30), (12, 4, 60, 127),
                        (16, 300, 60, 64),  # longer than max_duration: clamped
                        (600, 8, 76, 1)])  # after a gap longer than max_duration
    piano_b = symusic.Track("piano left", program=0, is_drum=False)  # a second track of the same program
    add_notes(piano_b, [(0, 16, 48, 70), (0, 4, 72, 110),  # unison with piano_a's 72: the longer (8) stays
                        (8, 8, 43, 30), (40, 6, 55, 50), (600, 2, 40, 3)])
    bass = symusic.Track("bass", program=33, is_drum=False)
    add_notes(bass, [(0, 8, 36, 80), (0, 8, 48, 80),  # unison with the piano's 48, another instrument: both stay
                     (16, 16, 38, 1), (1200, 4, 40, 127)])  # bin 1; a last note after a long gap
    violin = symusic.Track("violin", program=40, is_drum=False)
    add_notes(violin, [(4, 12, 79, 60), (4, 12, 79, 100),  # an exact unison: the louder stays
                       (100, 2, 81, 61)])
    drums = symusic.Track("kit", program=0, is_drum=True)
    add_notes(drums, [(0, 1, 36, 100), (0, 1, 42, 60), (0, 3, 42, 90),  # a doubled hit: the loudest stays
                      (4, 1, 42, 60), (8, 1, 38, 110), (300, 2, 49, 127)])
    score.tracks.extend([piano_a, piano_b, bass, violin, drums])
    return score


def test_built_score_every_note_back_with_its_velocity_bin() -> None:
    for name, config in CONFIGS.items():
        score = built_score()
        expected = expected_notes(score, config)
        [song] = encode_multitrack([read_notes(score.dumps_midi())], config)
        decoded = decode_multitrack(song.tokens, config)
        assert decoded.notes() == note_set(expected), name
        assert len(decoded) == note_count(expected), name
        bins = config.velocity_bins
        found: dict[tuple[int, int, int, int], list[int]] = {}
        for onset, pitch, duration, key, velocity in zip(decoded.steps.tolist(), decoded.pitches.tolist(),
                                                         decoded.durations.tolist(), decoded.instruments.tolist(),
                                                         decoded.velocities.tolist()):
            found.setdefault((onset, key, pitch, 0 if key == DRUM_INSTRUMENT else duration), []).append(velocity)
        for (onset, key, pitch), notes in expected.items():
            for duration in {d for d, _ in notes}:
                originals = np.array(sorted(v for d, v in notes if d == duration))
                velocities = np.array(sorted(found[(onset, key, pitch, duration)]))
                if bins:
                    np.testing.assert_array_equal(velocity_bins(velocities, bins), velocity_bins(originals, bins))
                    np.testing.assert_array_equal(velocities, bin_velocities(velocity_bins(originals, bins), bins))
                else:
                    assert (velocities == DEFAULT_VELOCITY).all()
        assert song.clamped_notes == 1, name  # the 300-step piano note; drums never count
        drum_merges = 1 if config.keep_drums else 0  # the doubled hit always merges
        pitched_merges = 2 if config.merge_unisons else 0  # the piano's and the violin's unisons
        assert song.merged_notes == pitched_merges + drum_merges, name
        assert song.notes == 18 + (6 if config.keep_drums else 0), name


def test_built_score_tokens() -> None:
    """The exact token layout of the opening, the gaps and the last group."""
    config = CONFIGS["default"]
    vocab = config.vocab
    [song] = encode_multitrack([read_notes(built_score().dumps_midi())], config)
    names = vocab.describe(song.tokens)
    b = lambda v: f"v{int(velocity_bins(v, 8))}"  # noqa: E731
    # group at step 0: piano (of the two 72s the longer, velocity 100), bass (its 48 is no unison with the
    # piano's: another instrument), drums (of the two 42s the loudest); at step 4 the violin (of two equal
    # 79s the louder) and a hit
    expected = ["<sos>", "i0", "n72", b(100), "d8", "n64", b(90), "d8", "n48", b(70), "d16",
                "i33", "n48", b(80), "d8", "n36", "d8",
                "h42", b(90), "h36", b(100),
                "<sep>", "d4", "i40", "n79", b(100), "d12", "h42", b(60)]
    assert names[: len(expected)] == expected
    steps = song.steps[: len(expected)].tolist()
    assert steps == [0] * 22 + [4] * 7
    assert song.instruments[: len(expected)].tolist() == [0] + [1] * 10 + [34] * 6 + [129] * 4 + [0, 0] + \
        [41] * 4 + [129] * 2
    # gaps longer than max_duration (256) are split: 300 -> 600 is 300 steps, 600 -> 1200 is 600 = 256 + 256 + 88
    gaps = [(names[i + 1], int(song.steps[i]), int(song.steps[i + 1])) for i in range(len(names) - 1)
            if names[i] == "<sep>"]
    assert ("d256", 300, 556) in gaps and ("d44", 556, 600) in gaps
    assert [g for g in gaps if g[1] >= 600] == [("d256", 600, 856), ("d256", 856, 1112), ("d88", 1112, 1200)]
    assert names[-5:] == ["i33", "n40", b(127), "d4", "<eos>"]
    assert names[-1] == "<eos>" and song.steps[-1] == 1200
    # the bar grid holds the time signature changes
    assert [(c.step, c.numerator, c.denominator) for c in song.grid.time_signatures()] == [(0, 4, 4), (32, 3, 4),
                                                                                          (80, 6, 8)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_built_score_token_round_trip(name: str) -> None:
    """decode -> multitrack_score -> MIDI -> read -> encode gives identical tokens."""
    config = CONFIGS[name]
    [song] = encode_multitrack([read_notes(built_score().dumps_midi())], config)
    decoded = decode_multitrack(song.tokens, config)
    score = multitrack_score(decoded, song.grid, [(0, 100.0), (64, 90.0)], config)
    [again] = encode_multitrack([read_notes(score.dumps_midi())], config)
    assert config.vocab.describe(again.tokens) == config.vocab.describe(song.tokens)
    np.testing.assert_array_equal(again.steps, song.steps)
    np.testing.assert_array_equal(again.instruments, song.instruments)
    assert again.grid.time_signatures() == song.grid.time_signatures()
    assert [(t.time, round(t.qpm, 3)) for t in score.tempos] == [(0, 100.0), (64 * 60, 90.0)]


def test_score_tracks() -> None:
    config = CONFIGS["default"]
    [song] = encode_multitrack([read_notes(built_score().dumps_midi())], config)
    score = multitrack_score(decode_multitrack(song.tokens, config), song.grid, [], config)
    assert [(t.name, t.program, t.is_drum) for t in score.tracks] == [
        ("Acoustic Grand Piano", 0, False), ("Electric Bass (finger)", 33, False), ("Violin", 40, False),
        ("Drums", 0, True)]
    assert [t.note_num() for t in score.tracks] == [10, 4, 2, 5]
    assert score.ticks_per_quarter == 480 and [t.qpm for t in score.tempos] == [120.0]
    reread = symusic.Score.from_midi(score.dumps_midi())  # the drums are written on channel 10
    assert [t.is_drum for t in reread.tracks] == [False, False, False, True]


def test_score_layers_overlapping_notes() -> None:
    """Notes of one pitch and instrument that overlap go on an extra track of that instrument."""
    config = CONFIGS["unmerged"]
    score = symusic.Score(TPQ)
    piano = symusic.Track("p", program=0, is_drum=False)
    add_notes(piano, [(0, 16, 60, 80), (0, 8, 60, 80), (4, 4, 60, 80), (32, 4, 60, 80)])
    score.tracks.append(piano)
    [song] = encode_multitrack([read_notes(score.dumps_midi())], config)
    out = multitrack_score(decode_multitrack(song.tokens, config), song.grid, [], config)
    assert [(t.name, t.program, t.note_num()) for t in out.tracks] == [
        ("Acoustic Grand Piano", 0, 2), ("Acoustic Grand Piano (overlapping notes 1)", 0, 1),
        ("Acoustic Grand Piano (overlapping notes 2)", 0, 1)]
    [again] = encode_multitrack([read_notes(out.dumps_midi())], config)
    np.testing.assert_array_equal(again.tokens, song.tokens)


# ---- decoding any sequence ---------------------------------------------------------------------------------
def test_decode_truncated_and_padded() -> None:
    config = CONFIGS["default"]
    vocab = config.vocab
    [song] = encode_multitrack([read_notes(built_score().dumps_midi())], config)
    full = decode_multitrack(song.tokens, config).notes()
    note_ids = set(vocab.ids_of("note"))
    previous: set = set()
    for cut in range(len(song.tokens) + 1):
        part = decode_multitrack(song.tokens[:cut], config).notes()
        assert part <= full and previous <= part, cut
        previous = part
        if cut and int(song.tokens[cut - 1]) in note_ids:  # a note without its duration is dropped
            assert part == decode_multitrack(song.tokens[: cut - 1], config).notes()
    assert previous == full
    padded = np.concatenate([[0, 0], song.tokens, [0, 5, 6, 7]])  # <pad>s, and tokens after <eos> ignored
    assert decode_multitrack(padded, config).notes() == full
    assert decode_multitrack(song.tokens[1:], config).notes() == full  # no <sos>
    assert len(decode_multitrack(np.zeros(0, dtype=np.int64), config)) == 0
    with pytest.raises(MidigenError, match="outside the vocabulary"):
        decode_multitrack(np.array([1, vocab.size]), config)


def test_instrument_feature_by_hand() -> None:
    config = CONFIGS["default"]
    v = config.vocab
    tokens = [v.SOS, v.instrument(5), v.note(60), v.velocity(3), v.duration(4), v.instrument(7), v.note(50),
              v.duration(2), v.hit(38), v.velocity(8), v.hit(36), v.SEP, v.duration(4), v.instrument(5), v.note(61),
              v.duration(1), v.EOS]
    assert instrument_feature(np.array(tokens), config).tolist() == [0, 6, 6, 6, 6, 8, 8, 8, 129, 129, 129, 0, 0,
                                                                     6, 6, 6, 0]
    notes = decode_multitrack(np.array(tokens), config)
    assert notes.steps.tolist() == [0, 0, 0, 0, 4]
    assert notes.instruments.tolist() == [5, 7, 128, 128, 5]
    assert notes.pitches.tolist() == [60, 50, 38, 36, 61]
    assert notes.durations.tolist() == [4, 2, 1, 1, 1]
    # velocity bins persist per instrument: instrument 5's later note keeps bin 3, drums bin 8
    centre = bin_velocities(np.array([3, 8]), 8).tolist()
    assert notes.velocities.tolist() == [centre[0], DEFAULT_VELOCITY, centre[1], centre[1], centre[0]]


def test_velocity_bins_and_centres() -> None:
    for bins in range(1, 128):
        b = np.arange(1, bins + 1)
        centres = bin_velocities(b, bins)
        assert ((centres >= 1) & (centres <= 127)).all()
        np.testing.assert_array_equal(velocity_bins(centres, bins), b)
        all_bins = velocity_bins(np.arange(128), bins)
        assert all_bins.min() == 1 and all_bins.max() == bins and (np.diff(all_bins) >= 0).all()
    assert velocity_bins(0, 8) == 1 and velocity_bins(127, 8) == 8 and velocity_bins(1, 8) == 1


def test_bad_file_is_named(tmp_path: Path) -> None:
    score = symusic.Score(96)
    track = symusic.Track("late", program=0, is_drum=False)
    track.notes.append(symusic.Note(2**31 - 1000, 10, 60, 80))  # about 1.8e8 steps: beyond MAX_SONG_STEPS
    score.tracks.append(track)
    late = tmp_path / "late.mid"
    score.dump_midi(str(late))
    good = read_notes(DATA / "multitrack" / "beat.mid")
    with pytest.raises(BadMidiError, match=r"late\.mid: timing out of range") as caught:
        encode_multitrack([good, read_notes(late)], CONFIGS["default"])
    assert caught.value.path == str(late)
    with pytest.raises(MidigenError, match="instruments on"):
        encode_multitrack([good], TokenizerConfig(instruments=False, velocity_bins=0))


# ---- instruments -----------------------------------------------------------------------------------------
def test_parse_instruments() -> None:
    assert parse_instruments("0,33,drums") == (0, 33, 128)
    assert parse_instruments("piano, bass ,drums,violin") == (0, 33, 128, 40)
    assert parse_instruments("Electric Piano,cello,Trumpet,strings,choir") == (4, 42, 56, 48, 52)
    assert parse_instruments("Acoustic Guitar (steel),127") == (25, 127)
    assert parse_instruments("flute,flute") == (73,)
    for bad in ("kazoo", "128", "-1", "piano,,bass", "", "1.5"):
        with pytest.raises(MidigenError) as caught:
            parse_instruments(bad)
        message = str(caught.value)
        assert "\n" not in message and "0-127" in message and "drums" in message and "violin" in message


def test_gm_names() -> None:
    assert len(GM_NAMES) == 128 and len(set(GM_NAMES)) == 128 and len(GM_FAMILIES) == 16
    assert (GM_NAMES[0], GM_NAMES[40], GM_NAMES[127]) == ("Acoustic Grand Piano", "Violin", "Gunshot")


def test_sort_fields_split_over_several_keys() -> None:
    """Columns too wide for one int64 key are sorted over several, as lexsort would."""
    from midigen.codec.multitrack import _sort_fields

    rng = np.random.default_rng(0)
    widths = [12, 25, 8, 7, 16, 7]  # 75 bits: two keys
    fields = [rng.integers(0, 2 ** min(w, 3), 5000) * (2 ** w - 1) // 7 for w in widths]
    order = np.lexsort(fields[::-1])
    for got, field in zip(_sort_fields(fields, widths), fields):
        np.testing.assert_array_equal(got, field[order])
    for got, field in zip(_sort_fields(fields[2:], widths[2:]), fields[2:]):  # one key
        np.testing.assert_array_equal(got, field[np.lexsort(fields[2:][::-1])])


def test_many_songs_with_long_durations_in_one_call() -> None:
    """A batch whose sort key needs more than 63 bits encodes as each song alone."""
    config = TokenizerConfig(max_duration=30000)
    tables = [read_notes(path) for path in REAL] * 12  # 264 songs: 9 bits of song
    together = encode_multitrack(tables, config)
    for table, song in zip(tables[:22], together[-22:]):
        [alone] = encode_multitrack([table], config)
        np.testing.assert_array_equal(song.tokens, alone.tokens)
        np.testing.assert_array_equal(song.instruments, alone.instruments)


def test_the_piano_roll_colours_a_decoded_orchestra_by_instrument(tmp_path: Path) -> None:
    from midigen.codec import load_tokenizer
    from midigen.evaluation.piece import load_piece
    from midigen.evaluation.render import render_piano_roll

    source = DATA / "multitrack" / "concerto_for_orchestra_1.mid"
    tokenizer = load_tokenizer(TokenizerConfig())
    decoded = tokenizer.decode(tokenizer.encode(source))
    piece = load_piece(decoded)
    programs = sorted({track.program for track in decoded.tracks if not track.is_drum and track.note_num()})
    assert piece.part_names == [GM_NAMES[program] for program in programs] and len(programs) > 5
    assert piece.drum_notes > 0  # its percussion is kept in the file, and left out of the roll
    assert render_piano_roll(decoded, tmp_path / "roll.png").stat().st_size > 0
