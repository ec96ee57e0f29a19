"""Staggered lanes: contiguous songs per lane (what memory needs), no idle lanes, lanes out of step, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SINGLE_STREAM
from test_training import config, interrupt_at_batch, weights

from midigen.data.batching import RandomChunks, StaggeredLanes, TokenArrays, model_inputs
from midigen.data.store import TokenStore
from midigen.model import ModelConfig, MusicTransformer
from midigen.model.memory import MemoryState
from midigen.training.recipe import make_sampler, train

CONTEXT = 16
LANES = 5


def lanes(prompt_store: Path, seed: int = 0, lanes: int = LANES, max_transpose: int = 0) -> StaggeredLanes:
    store = TokenStore(prompt_store)
    return StaggeredLanes(TokenArrays(store, "cpu"), store.split_indices("train"), CONTEXT, lanes, seed, max_transpose)


def batches(sampler: StaggeredLanes, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(sampler) for _ in range(count)]


def test_each_lane_reads_its_songs_in_order_with_no_lane_idle(prompt_store: Path) -> None:
    store = TokenStore(prompt_store)
    drawn = batches(lanes(prompt_store), 150)  # several times through the 19 short excerpts
    for lane in range(LANES):
        for step, batch in enumerate(drawn):
            song, offset, previous = int(batch["song"][lane]), int(batch["offset"][lane]), drawn[step - 1]
            assert song in store.split_indices("train")  # never idle, never a validation song
            tokens = store.song(song).tokens[offset : offset + CONTEXT + 1]
            row = batch["tokens"][lane].numpy()
            np.testing.assert_array_equal(row[: tokens.size], tokens)  # the song's own tokens, from `offset`
            assert not row[tokens.size :].any()  # padding only past the song's end, never the next song
            if step and not batch["new_song"][lane]:  # the next segment of the same song
                assert song == int(previous["song"][lane])
                assert offset == int(previous["offset"][lane]) + CONTEXT
            elif step:  # only once the previous song had no target left; the next one starts at its opening
                assert int(previous["offset"][lane]) + CONTEXT + 1 >= store.songs[int(previous["song"][lane])].length
                assert offset == 0
    assert max(int(batch["new_song"].sum()) for batch in drawn[1:]) < LANES  # lanes change songs at different steps


def test_lanes_start_out_of_step_at_random_points(prompt_store: Path) -> None:
    first = next(lanes(prompt_store, lanes=12))
    assert first["new_song"].all()
    offsets = first["offset"].numpy()
    assert (offsets > 0).sum() >= 10 and len(set(offsets.tolist())) >= 10
    store = TokenStore(prompt_store)
    assert all(offset + 1 < store.songs[int(song)].length for song, offset in zip(first["song"], offsets))


def test_more_lanes_than_songs(prompt_store: Path) -> None:
    songs = len(TokenStore(prompt_store).split_indices("train"))
    drawn = batches(lanes(prompt_store, lanes=2 * songs), 20)
    assert all((batch["song"] >= 0).all() for batch in drawn)


def test_memory_is_cleared_where_a_lane_takes_a_new_song(prompt_store: Path) -> None:
    # a lane's first segment of a song must score as if the model had seen nothing before: no other song leaks in
    torch.manual_seed(0)
    model = MusicTransformer(ModelConfig.preset("tiny", SINGLE_STREAM, memory="xl", context=CONTEXT)).eval()
    memory = MemoryState(model.config, LANES, torch.device("cpu"))
    checked = {"new song": 0, "same song": 0}
    with torch.no_grad():
        for step, batch in enumerate(batches(lanes(prompt_store), 40)):
            tokens, features, _ = model_inputs(batch, model.config.embeddings)
            logits = memory.forward(model, tokens, features, new_song=batch["new_song"]).logits
            if step == 0:
                continue
            for lane in range(LANES):
                alone = MemoryState(model.config, 1, torch.device("cpu"))  # a lane that has seen nothing
                lane_features = {name: values[lane : lane + 1] for name, values in features.items()}
                fresh = alone.forward(model, tokens[lane : lane + 1], lane_features,
                                      new_song=torch.ones(1, dtype=torch.bool)).logits[0]
                same = torch.allclose(logits[lane], fresh, atol=1e-4)
                if batch["new_song"][lane]:
                    assert same
                    checked["new song"] += 1
                else:  # the lane remembers its song's previous segment, so its scores differ from a fresh start
                    assert not same
                    checked["same song"] += 1
    assert checked["new song"] >= 5 and checked["same song"] >= 50


@pytest.mark.parametrize("memory, expected", [("none", RandomChunks), ("xl", StaggeredLanes),
                                              ("knn", StaggeredLanes)])
def test_auto_batching_takes_staggered_lanes_for_memory(prompt_store: Path, memory: str, expected: type) -> None:
    store = TokenStore(prompt_store)
    model = ModelConfig.preset("tiny", SINGLE_STREAM, memory=memory, context=CONTEXT)
    training = config(batching="auto")
    assert training.batching == "auto"
    sampler = make_sampler(TokenArrays(store, "cpu"), store.split_indices("train"), model, training, 0)
    assert type(sampler) is expected


def test_the_same_seed_gives_the_same_batches(prompt_store: Path) -> None:
    first, again, other = (batches(lanes(prompt_store, seed, max_transpose=5), 30) for seed in (3, 3, 4))
    for a, b in zip(first, again):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a["tokens"], c["tokens"]) for a, c in zip(first, other))


def test_saved_state_resumes_exactly(prompt_store: Path) -> None:
    straight = lanes(prompt_store, seed=1, max_transpose=5)
    batches(straight, 23)
    state = json.loads(json.dumps(straight.state_dict()))  # as a checkpoint keeps it
    resumed = lanes(prompt_store, seed=99, max_transpose=5)
    resumed.load_state_dict(state)
    for a, b in zip(batches(straight, 40), batches(resumed, 40)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("memory", ["xl", "knn"])
def test_training_with_staggered_lanes_resumes_after_ctrl_c_with_the_same_weights(
        memory: str, prompt_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelConfig.preset("tiny", SINGLE_STREAM, memory=memory, context=CONTEXT)
    straight, _ = train(prompt_store, tmp_path / "straight", model, config(batching="staggered"), progress=False)
    assert straight.step == 8
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, StaggeredLanes, 4)
        first, _ = train(prompt_store, tmp_path / "resumed", model, config(batching="staggered"), progress=False)
    assert first.interrupted and first.step == 4
    train(prompt_store, tmp_path / "resumed", None, config(), resume=True, progress=False)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("block_tokens", [1, 300, 1 << 22])
def test_pitch_ranges_read_in_blocks_equal_each_songs_own(prompt_store: Path, block_tokens: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import midigen.data.batching as batching

    monkeypatch.setattr(batching, "PITCH_SCAN_TOKENS", block_tokens)  # blocks of one song, several, or all
    store = TokenStore(prompt_store)
    data = TokenArrays(store, "memmap")
    lowest, highest = data.pitch_ranges()
    some = [1, 4, 5, 11]  # songs between them are not read: each range is its song's own
    some_lowest, some_highest = data.pitch_ranges(some)
    for song in range(len(store)):
        pitch = data.transposable[store.song(song).tokens.astype(np.int64)]
        pitch = pitch[pitch >= 0]
        assert pitch.size and (lowest[song], highest[song]) == (pitch.min(), pitch.max()), song
        expected = (pitch.min(), pitch.max()) if song in some else (128, -1)
        assert (some_lowest[song], some_highest[song]) == expected, song
