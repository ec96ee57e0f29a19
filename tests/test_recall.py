"""Recall tokens: repeats of passages farther back than a model can attend, found against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest

from midigen.evaluation.recall import recall_targets


def brute_force(tokens: np.ndarray, reach: int, min_repeat: int) -> np.ndarray:
    recall = np.zeros(tokens.size, dtype=bool)
    for i in range(min_repeat - 1, tokens.size):
        passage = tokens[i - min_repeat + 1 : i + 1]
        earlier = [j for j in range(min_repeat - 1, i) if np.array_equal(tokens[j - min_repeat + 1 : j + 1], passage)]
        recall[i] = bool(earlier) and i - earlier[-1] > reach
    return recall


@pytest.mark.parametrize("seed", range(4))
def test_recall_targets_match_a_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    theme = rng.integers(0, 3, 30)
    tokens = np.concatenate([theme, rng.integers(0, 3, 60), theme, rng.integers(0, 3, 10), theme])
    for reach, min_repeat in ((20, 4), (50, 8), (5, 2)):
        assert np.array_equal(recall_targets(tokens, reach, min_repeat), brute_force(tokens, reach, min_repeat))


def test_a_theme_beyond_reach_is_recalled_from_its_16th_token() -> None:
    rng = np.random.default_rng(0)
    theme, filler = rng.integers(100, 200, 40), rng.integers(200, 300, 200)
    tokens = np.concatenate([theme, filler, theme])
    recall = recall_targets(tokens, reach=150)
    second = 40 + 200
    assert np.flatnonzero(recall).tolist() == list(range(second + 15, second + 40))
    assert not recall_targets(tokens, reach=300).any()  # within reach: local attention sees the first time


def test_real_song_against_brute_force(prompt_store) -> None:  # noqa: ANN001
    from midigen.data.store import TokenStore

    store = TokenStore(prompt_store)
    longest = max(range(len(store)), key=lambda i: store.songs[i].length)
    tokens = np.asarray(store.song(longest).tokens)
    found = recall_targets(tokens, reach=64)
    assert np.array_equal(found, brute_force(tokens, 64, 16))
    assert found.any()  # pop songs repeat themselves


def test_eval_splits_every_token_into_recall_and_other(tiny_run, prompt_store) -> None:  # noqa: ANN001
    """recall_nll and other_nll partition the scored tokens: their weighted mean is the overall NLL, and the
    recall tokens are exactly those `recall_targets` finds in the split's songs."""
    from midigen.data.store import TokenStore
    from midigen.evaluation.nll import evaluate_split
    from midigen.inference import load_model

    loaded = load_model(tiny_run, "cpu")
    store = TokenStore(prompt_store)
    figures = evaluate_split(loaded.model, store, "train", batch_size=4)
    reach = loaded.model_config.context + loaded.model_config.memory_length
    expected = sum(int(recall_targets(store.song(i).tokens, reach)[1:].sum()) for i in store.split_indices("train"))
    assert figures["recall_tokens"] == expected > 0
    other = figures["tokens"] - figures["recall_tokens"]
    mean = (figures["recall_nll"] * figures["recall_tokens"] + figures["other_nll"] * other) / figures["tokens"]
    assert mean == pytest.approx(figures["nll"], rel=1e-6)  # float32 sums in another order
