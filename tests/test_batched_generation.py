"""Batched, streamed generation: a batch of lanes samples what each lane samples alone with its seed (memory
none, xl and knn; prompts of different lengths; lanes stopping at different times), the callback sees every
token and can stop a lane, and each kind of stop ends where it says."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import SINGLE_STREAM

from midigen.codec import load_tokenizer
from midigen.codec.config import Vocab
from midigen.errors import MidigenError
from midigen.inference.generate import (
    Generation,
    NoteEvent,
    Prompt,
    TokenEvent,
    empty_prompt,
    generate,
    generate_batch,
    generation_score,
    load_prompt,
)
from midigen.inference.model_files import LoadedModel, load_model
from midigen.inference.sampling import SamplingConfig

TOKENIZER = load_tokenizer(SINGLE_STREAM)
GRAMMAR = TOKENIZER.grammar
VOCAB = TOKENIZER.vocab
PROMPTS = Path(__file__).parent / "data" / "prompts"
FUER_ELISE = PROMPTS / "Fuer_Elise_-_Ludwig_Van_Beethoven_-_Verse.mid"  # 3/4: lanes in different grids
CANON = PROMPTS / "Canon_In_D_Major_-_Johann_Pachelbel_-_Chorus.mid"


@pytest.fixture(scope="module")
def runs(tiny_run: Path, prompt_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained run per memory mode; xl and knn with short segments, so generation crosses many."""
    from midigen.model import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.training.recipe import train

    found = {"none": tiny_run}
    for mode in ("xl", "knn"):
        run = tmp_path_factory.mktemp("runs") / mode
        model_config = ModelConfig.preset("tiny", SINGLE_STREAM, memory=mode, context=16)
        train(prompt_store, run, model_config, TrainConfig(max_steps=4, batch_size=3, eval_interval=4, log_interval=2,
                                                           warmup_steps=2, device="cpu", eval_tokens=500), progress=False)
        found[mode] = run
    return found


def prompts_of_different_lengths(trained: LoadedModel) -> list[Prompt]:
    """Empty, short, and longer than the context plus the XL window (so the kNN memory fills while prefilling)."""
    prompts = [load_prompt(FUER_ELISE, 2, TOKENIZER), empty_prompt(TOKENIZER), load_prompt(CANON, 8, TOKENIZER)]
    lengths = [len(prompt.sequence) for prompt in prompts]
    assert len(set(lengths)) == 3 and max(lengths) > trained.model_config.context + trained.model_config.memory_length
    return prompts


def tokens_of(generation: Generation) -> np.ndarray:
    return generation.sequence.tokens[generation.prompt_length :]


@pytest.mark.parametrize("mode", ["none", "xl", "knn"])
def test_a_batch_samples_what_each_lane_samples_alone(runs: dict[str, Path], mode: str) -> None:
    trained = load_model(runs[mode])
    prompts = prompts_of_different_lengths(trained)
    sampling = SamplingConfig(seed=10, top_p=0.95)
    batch = generate_batch(trained, prompts, sampling, bars=3, new_tokens=120, num_samples=2)
    assert len(batch) == 6
    lengths = {len(tokens_of(g)) for g in batch}
    assert len(lengths) > 1  # lanes stopped at different times, and left the batch
    for lane, generation in enumerate(batch):
        alone = generate(trained, prompts[lane // 2], SamplingConfig(seed=10 + lane, top_p=0.95), bars=3, new_tokens=120)
        assert generation.seed == alone.seed == 10 + lane
        assert np.array_equal(generation.sequence.tokens, alone.sequence.tokens), (mode, lane)
        for column in ("steps", "bars", "beats"):
            assert np.array_equal(getattr(generation.sequence, column), getattr(alone.sequence, column)), column
        assert GRAMMAR.check(generation.sequence.tokens) is None
    assert not np.array_equal(tokens_of(batch[0]), tokens_of(batch[1]))  # two samples of a prompt differ


def test_greedy_lanes_of_one_prompt_agree(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    batch = generate_batch(trained, [load_prompt(CANON, 2, TOKENIZER)], SamplingConfig(temperature=0, seed=3),
                           new_tokens=40, num_samples=3)
    assert all(np.array_equal(tokens_of(batch[0]), tokens_of(g)) for g in batch[1:])


def test_the_callback_sees_every_returned_token_in_order(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    seen: list[TokenEvent] = []
    batch = generate_batch(trained, [load_prompt(FUER_ELISE, 2, TOKENIZER), empty_prompt(TOKENIZER)],
                           SamplingConfig(seed=1), bars=2, num_samples=2, on_token=seen.append)
    for lane, generation in enumerate(batch):
        events = [e for e in seen if e.lane == lane]
        start = generation.prompt_length
        assert [e.token for e in events] == tokens_of(generation).tolist()
        assert [e.step for e in events] == generation.sequence.steps[start:].tolist()
        assert [e.bar for e in events] == generation.sequence.bars[start:].tolist()
        assert [e.count for e in events] == list(range(1, len(events) + 1))
        previous = generation.sequence.tokens[start - 1 : -1]
        expected = [(NoteEvent(e.step, int(p) - VOCAB.note(0), e.token - VOCAB.duration(1) + 1, 0),)
                    if VOCAB.is_note(int(p)) and VOCAB.is_duration(e.token) else () for p, e in zip(previous, events)]
        assert [e.notes for e in events] == expected and any(expected)


def test_the_callback_stops_one_lane_and_leaves_the_others_alone(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    prompts = [load_prompt(CANON, 2, TOKENIZER)]
    sampling = SamplingConfig(seed=4)
    full = generate_batch(trained, prompts, sampling, new_tokens=60, num_samples=3)
    notes = []

    def stop_lane_1_at_its_third_note(event: TokenEvent) -> bool:
        if event.lane == 1 and event.notes:
            notes.append(event.count)
        return len(notes) == 3 and event.lane == 1

    stopped = generate_batch(trained, prompts, sampling, new_tokens=60, num_samples=3, on_token=stop_lane_1_at_its_third_note)
    assert len(tokens_of(stopped[1])) == notes[2] < 60
    assert np.array_equal(tokens_of(stopped[1]), tokens_of(full[1])[: notes[2]])  # a prefix of what it would write
    for lane in (0, 2):
        assert np.array_equal(stopped[lane].sequence.tokens, full[lane].sequence.tokens)
    assert GRAMMAR.check(stopped[1].sequence.tokens) is None
    score = symusic.Score.from_midi(generation_score(stopped[1], TOKENIZER).dumps_midi())
    prompt_notes = TOKENIZER.sparse_score(TOKENIZER.decode(prompts[0].sequence.tokens, [(0, 100.0)], prompts[0].grid)).notes()
    assert len(TOKENIZER.sparse_score(score).notes() - prompt_notes) >= 1


def test_each_stop_ends_where_it_says(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    prompt = load_prompt(FUER_ELISE, 2, TOKENIZER)
    sampling = SamplingConfig(seed=2)

    assert [len(tokens_of(g)) for g in generate_batch(trained, [prompt], sampling, new_tokens=17, num_samples=2)] == [17, 17]

    for generation in generate_batch(trained, [prompt], sampling, bars=2, num_samples=3):
        end = prompt.grid.bar_start(prompt.bars + 2)
        steps = generation.sequence.steps[generation.prompt_length :]
        assert steps[-1] >= end and (steps[:-1] < end).all()  # it stops at the first token past the bars

    seconds = 3.0
    steps_per_second = prompt.tempo_qpm / 60 * TOKENIZER.config.steps_per_quarter
    for generation in generate_batch(trained, [prompt], sampling, seconds=seconds, num_samples=3):
        end = prompt.end_step + math.ceil(seconds * steps_per_second)
        steps = generation.sequence.steps[generation.prompt_length :]
        assert steps[-1] >= end and (steps[:-1] < end).all()

    # the end of the song: <eos> only where the model may end it, and a lane ends there
    hot = SamplingConfig(seed=0, temperature=5.0)
    ending = generate_batch(trained, [prompt], hot, new_tokens=200, until_end=True, num_samples=6)
    ended = [g for g in ending if tokens_of(g)[-1] == Vocab.EOS]
    assert ended and all(len(tokens_of(g)) < 200 for g in ended)
    for generation in ending:
        assert (tokens_of(generation)[:-1] != Vocab.EOS).all()
        assert GRAMMAR.check(generation.sequence.tokens) is None
        assert generation_score(generation, TOKENIZER).note_num() > 0
    never = generate_batch(trained, [prompt], hot, new_tokens=200, num_samples=6)
    assert all((tokens_of(g) != Vocab.EOS).all() for g in never)


@pytest.mark.parametrize("length, message", [
    (dict(), "give --bars, --tokens or --seconds"),
    (dict(bars=0), "--bars must be at least 1"),
    (dict(seconds=float("nan")), "--seconds"),
    (dict(new_tokens=5, num_samples=0), "--num-samples"),
])
def test_bad_lengths_are_refused(tiny_run: Path, length: dict, message: str) -> None:
    with pytest.raises(MidigenError, match=message):
        generate_batch(load_model(tiny_run), [empty_prompt(TOKENIZER)], SamplingConfig(), **length)


def test_the_device_grammar_follows_the_numpy_grammar_along_real_songs(prompt_files: list[Path]) -> None:
    """Every prompt file a lane of one batch (padded at the end, which changes no state), for both unison rules: at
    every position the torch tables on the device allow what the numpy tables allow, with and without the end of the
    song, and reach the same state, moving time on as the tokens' steps do, with the same `instruments` feature."""
    import torch

    for config in (SINGLE_STREAM, replace(SINGLE_STREAM, merge_unisons=False)):
        tokenizer = load_tokenizer(config)
        tables = tokenizer.grammar
        device = tables.on(torch.device("cpu"))
        songs = [tokenizer.encode(path) for path in prompt_files]
        width = max(len(song) for song in songs)
        batch = torch.full((len(songs), width), Vocab.PAD, dtype=torch.long)
        for lane, song in enumerate(songs):
            assert song.tokens[0] == Vocab.SOS and tables.check(song.tokens) is None
            batch[lane, : len(song)] = torch.from_numpy(song.tokens)
        states = [tables.start] * len(songs)
        state = torch.as_tensor(tables.states([song.tokens[:1] for song in songs]))
        steps = np.zeros(len(songs), dtype=np.int64)
        features = [tables.instrument_features(song.tokens) for song in songs]
        for index in range(1, width):
            for allow_end in (False, True):
                on_device = device.allowed(state, allow_end)
                expected = np.stack([tables.allowed(state, allow_end) for state in states])
                assert np.array_equal(on_device.numpy(), expected), (config, index, allow_end)
            tokens = batch[:, index]
            fed = device.feed(state, tokens)
            state = fed.state
            states = [tables.feed(lane_state, int(token)) for lane_state, token in zip(states, tokens.tolist())]
            assert [tuple(row[:3]) for row in state.tolist()] == states, (config, index)
            assert torch.equal(fed.lead, fed.advance)
            steps += fed.advance.numpy()
            for lane, song in enumerate(songs):
                if index < len(song):
                    assert steps[lane] == song.steps[index], (prompt_files[lane], index)
                    if "instruments" in fed.features:
                        assert int(fed.features["instruments"][lane]) == features[lane][index]
        assert all(lane_state[0] == tables.state_after(song.tokens)[0] for lane_state, song in zip(states, songs))
        assert {lane_state[0] for lane_state in states} == {tables.feed(tables.start, Vocab.EOS)[0]}  # every song ended


def test_knn_lanes_stacked_and_selected_search_as_they_did_alone() -> None:
    """A generation fills each prompt's kNN memory alone, stacks them into one batch, and drops finished lanes."""
    import torch

    from midigen.model.memory import KnnMemory

    torch.manual_seed(0)
    alone = [KnnMemory(1, 2, 8, 40, 4, torch.device("cpu"), "faiss") for _ in range(3)]
    for lane, memory in enumerate(alone):  # 0, 30 and 60 entries: one empty, one wrapped round its ring of 40
        for _ in range(lane * 3):
            keys = torch.nn.functional.normalize(torch.randn(1, 2, 10, 8), dim=-1)
            memory.write(keys, torch.randn(1, 2, 10, 8), torch.ones(1, 10, dtype=torch.bool))
    queries = torch.nn.functional.normalize(torch.randn(3, 2, 5, 8), dim=-1)

    stacked = KnnMemory.stacked(alone)
    whole = stacked.search(queries)
    assert stacked.sizes().tolist() == [0, 30, 40]
    for lane, memory in enumerate(alone):
        single = memory.search(queries[lane : lane + 1])
        assert torch.equal(whole.valid[lane], single.valid[0]) and torch.equal(whole.scores[lane], single.scores[0])
        neighbours = whole.values[whole.rows[lane]][whole.valid[lane]]
        assert torch.equal(neighbours, single.values[single.rows[0]][single.valid[0]])
    stacked.select(torch.tensor([2, 1]))
    kept = stacked.search(queries[[2, 1]])
    for row, lane in enumerate((2, 1)):
        single = alone[lane].search(queries[lane : lane + 1])
        assert torch.equal(kept.scores[row], single.scores[0])
        assert torch.equal(kept.values[kept.rows[row]][kept.valid[row]], single.values[single.rows[0]][single.valid[0]])


def test_the_demo_continues_every_validation_prompt_in_one_batch_and_renders_a_few(
    tiny_run: Path, prompt_store: Path, tmp_path: Path
) -> None:
    from midigen.data.store import TokenStore
    from midigen.demo import DemoConfig, DemoReport, prompts_for, write_pieces

    store = TokenStore(prompt_store)
    config = DemoConfig(out_dir=tmp_path, bars=2, rendered_chorales=1, extra_prompts=PROMPTS)
    chorales, extra = prompts_for(store, config)
    assert len(chorales) == len(store.split_indices("val")) >= 2 and len(extra) == 1
    report = DemoReport(tmp_path, {})
    trained = load_model(tiny_run)
    write_pieces(trained, store, config, report)
    assert [p.stem for p in report.pieces] == [p.stem for p in chorales + extra] + ["from-scratch"]
    rendered = [report.pieces[0], *report.pieces[len(chorales) :]]  # the first chorale's, the pop prompt's, from scratch
    assert report.pictures == [p.with_suffix(".png") for p in rendered]
    assert sorted(tmp_path.glob("generated/*.png")) == sorted(report.pictures)
    prompts = [load_prompt(path, config.prompt_bars, TOKENIZER) for path in chorales + extra]
    prompts.append(empty_prompt(TOKENIZER))
    for lane, (path, prompt) in enumerate(zip(report.pieces, prompts)):  # each as its prompt alone with its seed
        alone = generate(trained, prompt, SamplingConfig(temperature=0.9, top_p=0.95, seed=config.seed + lane), bars=2)
        expected = TOKENIZER.sparse_score(generation_score(alone, TOKENIZER)).notes()
        assert TOKENIZER.sparse_score(path).notes() == expected
