"""Evaluation: NLL over every token of a split, by type, against a bigram fitted on the training split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from midigen.data.store import TokenStore
from midigen.evaluation.nll import evaluate_split, fit_bigram, seconds_at
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


def hand_nll(model: torch.nn.Module, store: TokenStore) -> tuple[np.ndarray, np.ndarray]:
    """(NLL, target) of every target of the val split, each song in windows of `context` tokens from scratch, by a
    forward pass and a cross-entropy written out by hand."""
    context = model.config.context
    nll, targets = [], []
    for song in store.split_indices("val"):
        sequence = store.song(song)
        for start in range(0, len(sequence) - 1, context):
            window = sequence.slice(slice(start, start + context))
            tokens = torch.as_tensor(window.tokens).view(1, -1)
            features = {name: torch.as_tensor(window.features[name]).view(1, -1) for name in ("bars", "beats")}
            expected = torch.as_tensor(sequence.tokens[start + 1 : start + 1 + context])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(tokens, features).logits[0, : len(expected)].double(), -1)
            nll.append(-log_probs.gather(1, expected.view(-1, 1)).squeeze(1).numpy())
            targets.append(expected.numpy())
    return np.concatenate(nll), np.concatenate(targets)


def test_evaluation_equals_a_plain_forward_pass_over_each_window(tiny_run: Path, prompt_store: Path) -> None:
    """Without memory the evaluator scores each song in windows of `context` tokens, each from scratch: the same
    NLL, overall and per type, as a forward pass over each window and a cross-entropy written out by hand."""
    model, store = load_model(tiny_run).model.eval(), TokenStore(prompt_store)
    vocab = store.config.vocab
    assert model.config.memory == "none"
    figures = evaluate_split(model, store, "val", batch_size=3)
    nll_all, target_all = hand_nll(model, store)
    assert figures["tokens"] == len(target_all)
    assert figures["nll"] == pytest.approx(nll_all.mean(), rel=1e-5)
    notes, durations = vocab.ids_of("note"), vocab.ids_of("duration")
    types = {"note": (target_all >= notes.start) & (target_all < notes.stop),
             "duration": target_all >= durations.start, "sep": target_all == 3}
    for name, mask in types.items():
        assert mask.any() and figures["nll_by_type"][name] == pytest.approx(nll_all[mask].mean(), rel=1e-5), name
    split_total = figures["recall_nll"] * figures["recall_tokens"] + figures["other_nll"] * (len(target_all) - figures["recall_tokens"])
    assert split_total == pytest.approx(nll_all.sum(), rel=1e-5)


def test_seconds_at_follows_the_tempo_map() -> None:
    tempos = ((0, 120.0), (8, 60.0))  # 4 steps a quarter: 0.125 s a step, then 0.25 s a step from step 8
    assert seconds_at(4, tempos, 4) == pytest.approx(0.5)
    assert seconds_at(16, tempos, 4) == pytest.approx(8 * 0.125 + 8 * 0.25)
    assert seconds_at(16, ((0, 90.0),), 4) == pytest.approx(16 * 60 / 90 / 4)


def test_nll_per_note_and_bits_per_second(tiny_run: Path, prompt_store: Path, tmp_path: Path) -> None:
    """The summed NLL of the hand-written cross-entropy, over the targets that are notes and over the seconds the
    val songs span, each song given a tempo change halfway through (in a copy of the store)."""
    shutil.copytree(prompt_store, tmp_path / "store")
    original = TokenStore(tmp_path / "store")
    spq, notes = original.config.steps_per_quarter, original.config.vocab.ids_of("note")
    assert not original.config.vocab.ids_of("hit")  # no drums: the notes are the sounding tokens
    seconds, rows = 0.0, []
    for song, entry in enumerate(original.songs):
        if entry.split == "val":
            last = int(original.song(song).steps[-1])
            assert last >= 2
            entry = replace(entry, tempos=((0, 120.0), (last // 2, 80.0)))
            seconds += (last // 2) / spq * 60 / 120 + (last - last // 2) / spq * 60 / 80
        rows.append(json.dumps(entry.row()) + "\n")
    (tmp_path / "store" / "songs.jsonl").write_text("".join(rows))
    model, store = load_model(tiny_run).model.eval(), TokenStore(tmp_path / "store")
    assert store.songs[store.split_indices("val")[0]].tempos[1][1] == 80.0
    figures = evaluate_split(model, store, "val", batch_size=3)
    nll_all, target_all = hand_nll(model, store)
    note_count = int(((target_all >= notes.start) & (target_all < notes.stop)).sum())
    assert 0 < note_count < len(target_all)
    assert figures["nll_per_note"] == pytest.approx(nll_all.sum() / note_count, rel=1e-5)
    assert figures["seconds"] == pytest.approx(seconds)
    assert figures["bits_per_second"] == pytest.approx(nll_all.sum() / np.log(2) / seconds, rel=1e-5)


def test_eval_cli_writes_json(tiny_run: Path, prompt_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "midigen", "eval", str(tiny_run), "--data", str(prompt_store), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert {"nll", "ppl", "tokens", "nll_by_type", "bigram_nll", "nll_per_note", "bits_per_second"} <= figures.keys()
    assert figures["nll_per_note"] > 0 and figures["bits_per_second"] > 0
    assert "bigram nll" in done.stdout and "nll per note" in done.stdout and "bits per second" in done.stdout
