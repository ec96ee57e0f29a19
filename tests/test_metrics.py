"""Objective metrics against values worked out by hand on small constructed pieces, and set comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import symusic

from midigen.cli.main import main
from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import CONTINUATION_MARKER, load_score
from midigen.codec.registry import load_tokenizer
from midigen.errors import BadMidiError, MidigenError
from midigen.evaluation.piece import load_piece
from midigen.inference import load_model
from midigen.evaluation.metrics import (
    METRICS,
    compare_distributions,
    compare_sets,
    far_quote_mask,
    far_quotes,
    gaussian_kde,
    measure_set,
    piece_metrics,
)

TPQ = 480
C_MAJOR_SCALE = (60, 62, 64, 65, 67, 69, 71, 72)


def score_of(
    notes: list[tuple[float, float, int]], time_signatures: list[tuple[float, int, int]] | None = None
) -> symusic.Score:
    """A one-track score from (onset, duration, pitch) in quarter notes; time signatures (quarter, num, den)."""
    score = symusic.Score(TPQ)
    track = symusic.Track("piano", 0, False)
    for onset, duration, pitch in notes:
        track.notes.append(symusic.Note(round(onset * TPQ), round(duration * TPQ), pitch, 80))
    score.tracks.append(track)
    for quarter, numerator, denominator in time_signatures or [(0, 4, 4)]:
        score.time_signatures.append(symusic.TimeSignature(round(quarter * TPQ), numerator, denominator))
    score.tempos.append(symusic.Tempo(0, 120.0))
    return score


def quarters_of(pitches: tuple[int, ...], length: float = 1.0, start: float = 0.0) -> list[tuple[float, float, int]]:
    return [(start + i * length, length, pitch) for i, pitch in enumerate(pitches)]


def entropy_bits(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_c_major_scale() -> None:
    metrics = piece_metrics(score_of(quarters_of(C_MAJOR_SCALE)))
    # Two 4/4 bars of quarter notes; C twice, six other pitch classes once: H = 2/8·2 + 6·(1/8·3) bits.
    assert metrics == {
        "bars": 2,
        "notes": 8,
        "pitch_range": 12,
        "pitches_used": 8,
        "pitch_classes_used": 7,
        "pitch_class_entropy": pytest.approx(2.75),
        "scale_consistency": 1.0,
        "scale": "C major",  # A minor: same notes, as many on its tonic triad (A C C E), fewer on its tonic
        "polyphony": 1.0,
        "empty_beat_rate": 0.0,
        "groove_consistency": 1.0,
        "note_density": 1.0,
        "mean_ioi": 1.0,
        "repetition": 0.0,
        "longest_loop_repeats": 1,
        "degenerate_loop": False,
    }


def test_chromatic_run() -> None:
    metrics = piece_metrics(score_of(quarters_of(tuple(range(60, 72)), length=0.5)))
    # Twelve eighths fill bar 1 and half of bar 2: beats 7 and 8 are empty.
    assert metrics["bars"] == 2
    assert metrics["pitch_range"] == 11
    assert metrics["pitches_used"] == metrics["pitch_classes_used"] == 12
    assert metrics["pitch_class_entropy"] == pytest.approx(math.log2(12))
    assert metrics["scale_consistency"] == pytest.approx(7 / 12)
    assert metrics["scale"] == "C major"  # every major scale holds 7 of the 12; ties go to the first
    assert metrics["polyphony"] == 1.0
    assert metrics["empty_beat_rate"] == pytest.approx(2 / 8)
    # 48 grid steps per bar: bar 1 has onsets at 0, 6, ..., 42; bar 2 at 0, 6, 12, 18; 4 cells differ.
    assert metrics["groove_consistency"] == pytest.approx(1 - 4 / 48)
    assert metrics["note_density"] == pytest.approx(12 / 8)
    assert metrics["mean_ioi"] == pytest.approx(0.5)
    assert metrics["repetition"] == 0.0


def test_repeated_bar_is_a_degenerate_loop() -> None:
    bar = [(0, 1, 60), (1, 1, 64), (2, 2, 67)]
    eight_times = [(4 * n + onset, duration, pitch) for n in range(8) for onset, duration, pitch in bar]
    metrics = piece_metrics(score_of(eight_times))
    assert metrics["bars"] == 8
    assert metrics["repetition"] == pytest.approx(7 / 8)  # every bar but the first repeats the one before
    assert metrics["longest_loop_repeats"] == 8
    assert metrics["degenerate_loop"] is True
    assert metrics["groove_consistency"] == 1.0


def test_repeated_two_bar_phrase() -> None:
    phrase = quarters_of(C_MAJOR_SCALE)
    four_times = [(8 * n + onset, duration, pitch) for n in range(4) for onset, duration, pitch in phrase]
    metrics = piece_metrics(score_of(four_times))
    assert metrics["repetition"] == pytest.approx(6 / 8)  # bars 3..8 repeat the bar two before
    assert metrics["longest_loop_repeats"] == 4
    assert metrics["degenerate_loop"] is True


def test_short_ostinato_is_not_a_degenerate_loop() -> None:
    """A one-bar figure played four times is common in real music; a loop must last 8 bars to be flagged."""
    bar = [(0, 1, 60), (1, 1, 64), (2, 2, 67)]
    metrics = piece_metrics(score_of([(4 * n + o, d, p) for n in range(4) for o, d, p in bar]))
    assert metrics["longest_loop_repeats"] == 4
    assert metrics["degenerate_loop"] is False


def test_empty_bar() -> None:
    triad = [(0, 4, 60), (0, 4, 64), (0, 4, 67)]
    metrics = piece_metrics(score_of(triad + [(8 + onset, d, p) for onset, d, p in triad]))
    assert metrics["bars"] == 3
    assert metrics["polyphony"] == 3.0  # 6 whole notes (24 quarters) over 8 quarters of sound
    assert metrics["empty_beat_rate"] == pytest.approx(4 / 12)
    # Onset patterns {0}, {}, {0} over 48 steps: one cell differs between each pair of neighbours.
    assert metrics["groove_consistency"] == pytest.approx(1 - 1 / 48)
    assert metrics["note_density"] == pytest.approx(6 / 12)
    assert metrics["mean_ioi"] == 8.0
    # Bar 3 repeats bar 1 (two bars before); the empty bar repeats nothing and ends the loop.
    assert metrics["repetition"] == pytest.approx(1 / 2)
    assert metrics["longest_loop_repeats"] == 1


def test_three_four_waltz() -> None:
    def bar(start: float, bass: int) -> list[tuple[float, float, int]]:
        return [(start, 1, bass), (start + 1, 1, 64), (start + 1, 1, 67), (start + 2, 1, 64), (start + 2, 1, 67)]

    metrics = piece_metrics(score_of(bar(0, 48) + bar(3, 43), [(0, 3, 4)]))
    assert metrics["bars"] == 2
    assert metrics["pitch_classes_used"] == 3
    assert metrics["pitch_class_entropy"] == pytest.approx(entropy_bits([1, 4, 5]))  # C once, E 4 times, G 5 times
    assert metrics["scale_consistency"] == 1.0
    assert metrics["scale"] == "C major"  # C, G and F major all hold C, E, G; C's triad has most notes
    assert metrics["polyphony"] == pytest.approx(10 / 6)
    assert metrics["empty_beat_rate"] == 0.0
    assert metrics["groove_consistency"] == 1.0  # onsets at 0, 12, 24 of 36 steps in both bars
    assert metrics["note_density"] == pytest.approx(10 / 6)
    assert metrics["mean_ioi"] == 1.0
    assert metrics["repetition"] == 0.0


def test_bars_follow_a_time_signature_change() -> None:
    notes = quarters_of((60, 62, 64, 65)) + [(4, 3, 67)]
    metrics = piece_metrics(score_of(notes, [(0, 4, 4), (4, 3, 4)]))
    assert metrics["bars"] == 2
    assert metrics["note_density"] == pytest.approx(5 / 7)
    # Bar 1: onsets at 0, 12, 24, 36 of 48 steps; bar 2: at 0 of 36 (padded to 48): 3 cells differ.
    assert metrics["groove_consistency"] == pytest.approx(1 - 3 / 48)


def test_continuation_only_measures_what_follows_the_marker() -> None:
    prompt = quarters_of((60, 62, 64, 65))
    continuation = [(4, 4, 67), (8, 4, 67)]
    score = score_of(prompt + continuation)
    score.markers.append(symusic.TextMeta(4 * TPQ, CONTINUATION_MARKER))
    whole, generated = piece_metrics(score), piece_metrics(score, continuation_only=True)
    assert (whole["bars"], whole["notes"]) == (3, 6)
    assert (generated["bars"], generated["notes"]) == (2, 2)
    assert generated["pitches_used"] == 1
    assert generated["note_density"] == pytest.approx(2 / 8)
    assert generated["repetition"] == pytest.approx(1 / 2)
    with pytest.raises(BadMidiError, match="no continuation marker"):
        piece_metrics(score_of(prompt), continuation_only=True)


def test_kde_is_a_mixture_of_gaussians() -> None:
    density = gaussian_kde(np.array([0.0, 2.0]), 1.0, np.array([1.0, 0.0]))
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    assert density == pytest.approx([phi(1), (phi(0) + phi(2)) / 2])


def test_overlap_and_kl_of_two_gaussians() -> None:
    """Large samples of N(0, 1) and N(1, 1): their KDEs are Gaussians of variance 1 + h² (h = n^-1/5),
    whose overlap area is 2Φ(-d/2σ) and whose KL divergence is d²/2σ²."""
    rng = np.random.default_rng(0)
    n = 4000
    reference, generated = rng.normal(0, 1, n), rng.normal(1, 1, n)
    sigma = math.sqrt(1 + n ** (-2 / 5))
    scores = compare_distributions(generated, reference)
    assert scores["overlap_area"] == pytest.approx(1 + math.erf(-0.5 / sigma / math.sqrt(2)), abs=0.03)
    assert scores["kl_divergence"] == pytest.approx(1 / (2 * sigma**2), abs=0.05)


def test_equal_sets_overlap_fully() -> None:
    same = {"overlap_area": pytest.approx(1.0), "kl_divergence": pytest.approx(0.0, abs=1e-9)}
    values = np.array([1.0, 2.0, 2.5, 4.0])
    assert compare_distributions(values, values) == same
    constant = np.array([7.0, 7.0, 7.0])  # no spread in either set: equal distributions all the same
    assert compare_distributions(constant, constant) == same
    apart = compare_distributions(np.array([0.0, 0.1, 0.2]), np.array([100.0, 100.1, 100.2]))
    assert apart["overlap_area"] == pytest.approx(0.0, abs=1e-6)
    assert apart["kl_divergence"] > 10


def test_real_prompts_against_themselves(prompt_files: list[Path]) -> None:
    result = compare_sets([prompt_files[0].parent], prompt_files)
    assert len(result["generated"]["pieces"]) == len(prompt_files) == 19
    for metric in METRICS:
        assert result["comparison"][metric]["overlap_area"] == pytest.approx(1.0)
        assert result["comparison"][metric]["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    for metrics in result["generated"]["pieces"].values():
        assert 0 <= metrics["empty_beat_rate"] <= 1 and 0 < metrics["scale_consistency"] <= 1
        assert metrics["polyphony"] >= 1


def test_bad_files_in_a_folder_are_skipped(tmp_path: Path, prompt_files: list[Path]) -> None:
    (tmp_path / "a_text.mid").write_text("not midi")
    (tmp_path / "b_empty.mid").write_bytes(b"")
    score_of([]).dump_midi(str(tmp_path / "c_no_notes.mid"))
    (tmp_path / "d_good.mid").write_bytes(prompt_files[0].read_bytes())
    result = measure_set([tmp_path])
    assert list(result["pieces"]) == [str(tmp_path / "d_good.mid")]
    assert result["skipped"] == [
        f"{tmp_path / 'a_text.mid'}: not a MIDI file (no MThd header)",
        f"{tmp_path / 'b_empty.mid'}: empty file (0 bytes)",
        f"{tmp_path / 'c_no_notes.mid'}: no notes",
    ]


def test_no_readable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MidigenError, match="no MIDI file could be measured"):
        measure_set([tmp_path])


@pytest.mark.parametrize("content", [b"hello, not a MIDI file", b""])
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    bad = tmp_path / "bad.mid"
    bad.write_bytes(content)
    assert main(["metrics", str(bad), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"midigen metrics: error: {bad}: ")


def test_cli_compares_and_writes_json_and_png(
    tmp_path: Path, prompt_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    generated = tmp_path / "generated"
    generated.mkdir()
    for n in range(3):
        bar = [(0, 1, 60 + n), (1, 1, 64), (2, 2, 67)]
        score_of([(4 * k + o, d, p) for k in range(8) for o, d, p in bar]).dump_midi(str(generated / f"loop{n}.mid"))
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    code = main(["metrics", str(generated), "--reference", *map(str, prompt_files[:5]), "--json", str(out_json),
                 "--png", str(out_png), "--quiet"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert len(result["generated"]["degenerate_loops"]) == 3 and result["reference"]["degenerate_loops"] == []
    assert result["comparison"]["repetition"]["overlap_area"] < 0.1
    assert "3 with a degenerate loop" in capsys.readouterr().out
    from matplotlib.image import imread

    pixels = imread(out_png)
    assert pixels.shape[:2] == (660, 1280)  # 3 rows × 4 panels of 320 × 220 px
    assert pixels[..., :3].std() > 0.05


# Far quotes, on the tokens of real prompts. The 48 opening tokens of this one hold 33 passages of 16 tokens
# (ending at its tokens 15..47) found nowhere else in it, nor in the other prompt's opening.
QUOTED, OTHER = "Call_Me_Maybe_-_Carly_Rae_Jepsen_-_Chorus.mid", "Levels_-_Avicii_-_Verse.mid"


def prompt_tokens(prompt_files: list[Path], name: str) -> np.ndarray:
    (path,) = [path for path in prompt_files if path.name == name]
    return load_tokenizer(TokenizerConfig()).encode(path).tokens


def test_a_quote_from_beyond_the_window_is_counted(prompt_files: list[Path]) -> None:
    prompt = prompt_tokens(prompt_files, QUOTED)
    tokens = np.concatenate([prompt, prompt[:48]])  # the continuation quotes the opening, len(prompt) tokens back
    quotes = far_quote_mask(tokens, prompt.size, window=prompt.size - 1)
    assert quotes.shape == (48,)
    assert np.flatnonzero(quotes).tolist() == list(range(15, 48))


def test_a_quote_within_the_window_is_not_counted(prompt_files: list[Path]) -> None:
    prompt = prompt_tokens(prompt_files, QUOTED)
    tokens = np.concatenate([prompt, prompt[:48]])
    assert not far_quote_mask(tokens, prompt.size, window=prompt.size).any()  # exactly `window` back: in sight


def test_no_repeat_no_quote(prompt_files: list[Path]) -> None:
    prompt = prompt_tokens(prompt_files, QUOTED)
    tokens = np.concatenate([prompt, prompt_tokens(prompt_files, OTHER)[:48]])
    assert not far_quote_mask(tokens, prompt.size, window=0).any()


def test_the_continuation_quoting_itself_is_not_a_prompt_quote(prompt_files: list[Path]) -> None:
    prompt, other = prompt_tokens(prompt_files, OTHER), prompt_tokens(prompt_files, QUOTED)
    tokens = np.concatenate([prompt, other[:100], other[:48]])  # the continuation repeats its own opening
    assert not far_quote_mask(tokens, prompt.size, window=10).any()
    prompt = np.concatenate([prompt, other[:48]])  # now the prompt ends with it too: only the first copy counts
    tokens = np.concatenate([prompt, other[:100], other[:48]])
    assert np.flatnonzero(far_quote_mask(tokens, prompt.size, window=10)).tolist() == list(range(15, 48))


def test_far_quotes_of_a_generated_file_and_in_the_cli_json(
    tmp_path: Path, prompt_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A real prompt, then a copy of it from the next bar on behind `midigen generate`'s marker."""
    (path,) = [path for path in prompt_files if path.name == QUOTED]
    score, end = load_score(path), int(load_piece(path).bar_starts[-1])
    for track in score.tracks:
        track.notes.extend([symusic.Note(n.time + end, n.duration, n.pitch, n.velocity) for n in list(track.notes)])
    score.markers.append(symusic.TextMeta(end, CONTINUATION_MARKER))
    # The prompt's notes are 184 tokens (its start and end tokens apart): the copy quotes them 184 tokens back.
    beyond, within = far_quotes(score, window=183), far_quotes(score, window=184)
    assert beyond is not None and within is not None
    assert beyond["continuation_tokens"] == within["continuation_tokens"] == 184
    assert beyond["far_quotes"] > 100 and beyond["far_quote_share"] == beyond["far_quotes"] / 184
    assert within["far_quotes"] == 0 and within["far_quote_share"] == 0.0
    assert far_quotes(path) is None  # no marker: not a continuation

    generated = tmp_path / "generated.mid"
    score.dump_midi(str(generated))
    out_json = tmp_path / "m.json"
    assert main(["metrics", str(generated), str(path), "--window", "183", "--json", str(out_json), "--quiet"]) == 0
    pieces = json.loads(out_json.read_text())["pieces"]
    assert {key: pieces[str(generated)][key] for key in beyond} == beyond
    assert "far_quotes" not in pieces[str(path)]
    assert f"far quotes: {beyond['far_quotes']} of 184 continuation tokens" in capsys.readouterr().out


def test_metrics_counts_far_quotes_in_the_tokens_and_reach_of_the_model_given(
    tmp_path: Path, prompt_files: list[Path], tiny_run: Path
) -> None:
    """With --model, far quotes are counted in the model's tokens (the tiny run's single stream) beyond what it
    attends to (its 64-token context, no XL memory), not in the default tokenizer beyond 512 tokens."""
    (path,) = [path for path in prompt_files if path.name == QUOTED]
    score, end = load_score(path), int(load_piece(path).bar_starts[-1])
    for track in score.tracks:
        track.notes.extend([symusic.Note(n.time + end, n.duration, n.pitch, n.velocity) for n in list(track.notes)])
    score.markers.append(symusic.TextMeta(end, CONTINUATION_MARKER))
    generated = tmp_path / "generated.mid"
    score.dump_midi(str(generated))
    trained = load_model(tiny_run)
    assert trained.model.config.reach == 64 and not trained.tokenizer.instruments
    expected = far_quotes(generated, 64, trained.tokenizer)
    assert expected is not None and expected["far_quotes"] > 0
    assert far_quotes(generated)["far_quotes"] == 0  # the default: 512 tokens back is in sight

    out_json = tmp_path / "m.json"
    assert main(["metrics", str(generated), "--model", str(tiny_run), "--json", str(out_json), "--quiet"]) == 0
    measured = json.loads(out_json.read_text())["pieces"][str(generated)]
    assert {key: measured[key] for key in expected} == expected
    assert main(["metrics", str(generated), "--model", str(tmp_path), "--quiet"]) == 2  # not a run: one line
