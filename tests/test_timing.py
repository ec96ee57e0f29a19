"""The bar grid: bars and positions in bars from real time-signature maps, checked by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import SINGLE_STREAM
from midi_factory import make_score

from midigen.codec import BarGrid, TimeSignatureChange, load_tokenizer
from midigen.codec.timing import bar_steps_of, ticks_to_steps

SPQ = 8  # steps per quarter note: a 4/4 bar is 32 steps
BEAT_POSITIONS = 64


def grid(*changes: tuple[int, int, int], spq: int = SPQ, beat_positions: int = BEAT_POSITIONS) -> BarGrid:
    return BarGrid([TimeSignatureChange(*c) for c in changes], spq, beat_positions)


def located(g: BarGrid, steps: list[int]) -> list[tuple[int, int]]:
    bars, beats = g.locate(np.array(steps))
    return list(zip(bars.tolist(), beats.tolist()))


@pytest.mark.parametrize(
    ("numerator", "denominator", "steps"),
    [(4, 4, 32), (3, 4, 24), (6, 8, 24), (5, 4, 40), (7, 8, 28), (2, 2, 32), (12, 8, 48), (1, 16, 2)],
)
def test_bar_lengths(numerator: int, denominator: int, steps: int) -> None:
    assert bar_steps_of(numerator, denominator, SPQ) == steps


def test_no_time_signature_means_four_four() -> None:
    assert located(grid(), [0, 31, 32, 100]) == [(0, 0), (0, 31), (1, 0), (3, 4)]


def test_three_four_by_hand() -> None:
    # bars of 3 quarters = 24 steps: step 30 is 6 steps (three sixteenths) into bar 1
    assert located(grid((0, 3, 4)), [0, 8, 23, 24, 30, 47, 48, 240]) == [
        (0, 0), (0, 8), (0, 23), (1, 0), (1, 6), (1, 23), (2, 0), (10, 0)
    ]


def test_six_eight_by_hand() -> None:
    # six eighth notes of 4 steps each = 24 steps; the second dotted-quarter beat starts at 12
    assert located(grid((0, 6, 8)), [0, 4, 12, 20, 24, 36, 72]) == [(0, 0), (0, 4), (0, 12), (0, 20), (1, 0), (1, 12), (3, 0)]


def test_change_mid_piece_by_hand() -> None:
    # two bars of 4/4 (steps 0..63), then 3/4 from step 64, then 5/4 from step 64 + 3 * 24 = 136
    g = grid((0, 4, 4), (64, 3, 4), (136, 5, 4))
    assert located(g, [31, 32, 63, 64, 70, 88, 135, 136, 175, 176, 200]) == [
        (0, 31), (1, 0), (1, 31), (2, 0), (2, 6), (3, 0), (4, 23), (5, 0), (5, 39), (6, 0), (6, 24)
    ]


def test_change_in_the_middle_of_a_bar_starts_a_new_bar() -> None:
    # 4/4, then 3/4 written at step 48, halfway through bar 1: bar 1 is cut short
    g = grid((0, 4, 4), (48, 3, 4))
    assert located(g, [32, 47, 48, 72]) == [(1, 0), (1, 15), (2, 0), (3, 0)]
    assert [g.bar_start(b) for b in range(5)] == [0, 32, 48, 72, 96]


def test_bar_start_inverts_locate() -> None:
    g = grid((0, 3, 4), (48, 7, 8), (104, 4, 4), (130, 6, 8))
    steps = np.arange(400)
    bars, beats = g.locate(steps)
    starts = np.array([g.bar_start(int(b)) for b in bars])
    np.testing.assert_array_equal(starts + beats, steps)


def test_positions_are_bounded_and_wrap_in_bars_longer_than_the_bound() -> None:
    g = grid((0, 9, 4))  # 72 steps per bar, bound 64
    assert located(g, [63, 64, 70, 72]) == [(0, 63), (0, 0), (0, 6), (1, 0)]
    random_grid = grid((0, 15, 8), (100, 17, 16), (300, 9, 4), (500, 3, 4))
    _, beats = random_grid.locate(np.arange(2000))
    assert beats.min() == 0 and beats.max() == BEAT_POSITIONS - 1


def test_changes_are_normalised() -> None:
    # out of order; restated 3/4 at 24 (not a new bar); two at step 48, the last written wins
    g = grid((48, 5, 4), (24, 3, 4), (0, 3, 4), (48, 2, 4))
    assert [(c.step, c.numerator, c.denominator) for c in g.time_signatures()] == [(0, 3, 4), (48, 2, 4)]
    # a signature replaced at its own step by a restatement of the previous one leaves no change behind
    g = grid((0, 3, 4), (30, 2, 4), (30, 3, 4))
    assert [(c.step, c.numerator, c.denominator) for c in g.time_signatures()] == [(0, 3, 4)]
    assert located(g, [30]) == [(1, 6)]


@pytest.mark.parametrize(
    "changes",
    [
        [(0, 3, 4)],
        [(0, 6, 8), (96, 4, 4)],
        [(0, 4, 4), (48, 3, 4), (120, 5, 8)],  # including a bar cut short by a change
        [(0, 9, 4), (144, 2, 4)],  # bars longer than the position bound
    ],
)
@pytest.mark.parametrize("every", [1, 5, 13])
def test_grid_is_rebuilt_from_positions(changes: list[tuple[int, int, int]], every: int) -> None:
    original = grid(*changes)
    steps = np.arange(0, 600, every)
    bars, beats = original.locate(steps)
    rebuilt = BarGrid.from_positions(steps, bars, beats, SPQ, BEAT_POSITIONS)
    all_steps = np.arange(600)
    for rebuilt_array, original_array in zip(rebuilt.locate(all_steps), original.locate(all_steps)):
        np.testing.assert_array_equal(rebuilt_array, original_array)


def test_ticks_to_steps_rounds_halves_up() -> None:
    # 480 ticks per quarter, 8 steps per quarter: 60 ticks per step
    np.testing.assert_array_equal(ticks_to_steps(np.array([0, 29, 30, 89, 90, 600]), 8, 480), [0, 0, 1, 1, 2, 10])
    assert ticks_to_steps(7, 8, 1) == 56


@pytest.mark.parametrize("ticks_per_step", [60, 1, 7])
def test_tokens_carry_bars_and_beats_of_the_file(ticks_per_step: int) -> None:
    # 3/4 for two bars, 6/8 for two bars, then 4/4: a note at the start of each bar and one mid-bar
    score = make_score(
        [[(0, 60, 4), (30, 62, 4), (48, 64, 4), (60, 65, 4), (96, 67, 4), (104, 69, 4), (150, 71, 4)]],
        ticks_per_step=ticks_per_step,
        time_signatures=[(0, 3, 4), (48, 6, 8), (96, 4, 4)],
    )
    tokenizer = load_tokenizer(replace(SINGLE_STREAM, steps_per_quarter=SPQ))
    sequence = tokenizer.encode(score)
    note_tokens = np.array([tokenizer.vocab.is_note(t) for t in sequence.tokens])
    got = list(zip(sequence.steps[note_tokens].tolist(), sequence.bars[note_tokens].tolist(), sequence.beats[note_tokens].tolist()))
    # by hand: bars 0-1 are 24 steps (3/4), bars 2-3 are 24 steps (6/8), bar 4 on are 32 steps
    assert got == [(0, 0, 0), (30, 1, 6), (48, 2, 0), (60, 2, 12), (96, 4, 0), (104, 4, 8), (150, 5, 22)]
