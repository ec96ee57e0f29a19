"""Evaluation: NLL over every token of a split, by type, against a bigram fitted on the training split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midigen.data.store import TokenStore
from midigen.evaluation.nll import evaluate_split, fit_bigram
from midigen.inference.model_files import load_model


def test_bigram_is_add_one_smoothed_counts() -> None:
    log_probs = fit_bigram([np.array([0, 1, 1, 2]), np.array([1, 2])], vocab_size=3)
    # from 1: counts 1→1 once, 1→2 twice, plus one each: (1, 2, 3) / 6
    np.testing.assert_allclose(np.exp(log_probs[1]), [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(np.exp(log_probs[2]), [1 / 3, 1 / 3, 1 / 3])


def test_evaluation_scores_every_token_of_the_split_once(tiny_run: Path, prompt_store: Path) -> None:
    trained = load_model(tiny_run)
    store = TokenStore(prompt_store)
    figures = evaluate_split(trained.model, store, "val", batch_size=3)
    songs = store.split_indices("val")
    assert figures["tokens"] == sum(store.songs[i].length - 1 for i in songs)
    bigram = fit_bigram((store.song(i).tokens for i in store.split_indices("train")), store.config.vocab.size)
    expected_bigram = np.mean(np.concatenate([-bigram[t[:-1], t[1:]] for t in (store.song(i).tokens for i in songs)]))
    assert figures["bigram_nll"] == pytest.approx(expected_bigram)
    assert figures["ppl"] == pytest.approx(np.exp(figures["nll"]))
    assert set(figures["nll_by_type"]) == {"note", "duration", "sep"}
    assert 0 < figures["nll"] < np.log(store.config.vocab.size) + 1


def test_eval_cli_writes_json(tiny_run: Path, prompt_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "midigen", "eval", str(tiny_run), "--data", str(prompt_store), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert {"nll", "ppl", "tokens", "nll_by_type", "bigram_nll"} <= figures.keys()
    assert "bigram nll" in done.stdout
