"""Byte-pair encoding across timesteps on the seed codec: exact round trips against the base tokenizer on real MIDI,
stores with merges, deterministic learning, merges that cross bars (unless asked not to), and a grammar whose
precomputed tables agree with folding each merged token's base tokens through the base grammar."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from midigen.cli.main import main
from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.bpe import PENDING, BpeTokenizer
from midigen.codec.grammar import DRUMS, NO_LOWEST, PHASES
from midigen.codec.tokenizer import TokenSequence
from midigen.data.bpe import learn_merges, train_store
from midigen.data.store import TokenStore

from conftest import SINGLE_STREAM

DATA = Path(__file__).parent / "data"
MULTITRACK = sorted((DATA / "multitrack").glob("*.mid"))
PROMPTS = sorted((DATA / "prompts").glob("*.mid"))
MERGES = 300


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base stores of the real files (multi-track: the band, orchestra and drum files and the prompts; single
    stream: the prompts), and each with merges learned on its training songs."""
    from midigen.data.encode import encode_files

    root = tmp_path_factory.mktemp("bpe")
    paths = {}
    for name, config, inputs in (("multitrack", TokenizerConfig(), [DATA / "multitrack", DATA / "prompts"]),
                                 ("single", SINGLE_STREAM, [DATA / "prompts"])):
        encode_files(inputs, root / name, config, workers=1, progress=False)
        paths[name] = root / name
        train_store(root / name, root / f"{name}-bpe", config.vocab.size + MERGES, progress=False)
        paths[f"{name}-bpe"] = root / f"{name}-bpe"
    return paths


def bpe_tokenizer(stores: dict[str, Path], name: str) -> BpeTokenizer:
    tokenizer = TokenStore(stores[f"{name}-bpe"]).tokenizer
    assert isinstance(tokenizer, BpeTokenizer)
    return tokenizer


def notes_of(score) -> list[tuple[int, int, int, int, int]]:  # noqa: ANN001
    return sorted((track.program, track.is_drum, note.time, note.pitch, note.duration)
                  for track in score.tracks for note in track.notes)


@pytest.mark.parametrize("name", ["multitrack", "single"])
def test_a_bpe_tokenizer_round_trips_real_midi_exactly_as_its_base(stores: dict[str, Path], name: str) -> None:
    tokenizer = bpe_tokenizer(stores, name)
    base = tokenizer.base
    files = PROMPTS + (MULTITRACK if name == "multitrack" else [])
    base_tokens = merged_tokens = 0
    for path in files:
        base_sequence, sequence = base.encode(path), tokenizer.encode(path)
        expanded, firsts = tokenizer.expand(sequence.tokens)
        assert np.array_equal(expanded, base_sequence.tokens), path
        # a merged token sits where its first base token sits, with its features
        assert np.array_equal(sequence.steps, base_sequence.steps[firsts])
        for feature, values in base_sequence.features.items():
            assert np.array_equal(sequence.features[feature], values[firsts]), feature
        assert notes_of(tokenizer.decode(sequence)) == notes_of(base.decode(base_sequence)), path
        again = tokenizer.with_positions(sequence.tokens, sequence.grid)
        assert np.array_equal(again.steps, sequence.steps) and np.array_equal(again.bars, sequence.bars)
        assert tokenizer.grammar.check(sequence.tokens) is None, path
        base_tokens, merged_tokens = base_tokens + len(base_sequence), merged_tokens + len(sequence)
    assert merged_tokens < 0.8 * base_tokens


@pytest.mark.parametrize("name", ["multitrack", "single"])
def test_a_bpe_store_decodes_as_its_base_store(stores: dict[str, Path], name: str) -> None:
    base, merged = TokenStore(stores[name]), TokenStore(stores[f"{name}-bpe"])
    assert merged.complete and len(merged) == len(base) and merged.config.merges
    assert replace(merged.config, merges=()) == base.config
    assert TokenizerConfig.load(merged.root / "tokenizer.json") == merged.config  # the merges travel with the store
    assert merged.num_tokens < base.num_tokens
    all_notes = tokens_with_notes = 0
    for index, (entry, merged_entry) in enumerate(zip(base.songs, merged.songs)):
        assert (merged_entry.path, merged_entry.split, merged_entry.hash) == (entry.path, entry.split, entry.hash)
        assert merged.song(index).tokens.max() < merged.config.vocab.size
        assert merged.tokenizer.grammar.check(merged.song(index).tokens) is None
        assert notes_of(merged.tokenizer.decode(merged.song(index))) == notes_of(base.tokenizer.decode(base.song(index)))
        # per-note figures (`nll_per_note`) count the notes inside merged tokens, as many as the base tokens hold
        notes = int(merged.tokenizer.note_counts()[merged.song(index).tokens].sum())
        assert notes == int(base.tokenizer.sounding()[base.song(index).tokens].sum())
        tokens_with_notes += int(merged.tokenizer.sounding()[merged.song(index).tokens].sum())
        all_notes += notes
    assert all_notes > tokens_with_notes  # some merged tokens hold several notes


def test_a_config_saved_before_merges_loads_without_them(tmp_path: Path) -> None:
    data = TokenizerConfig().to_dict()
    del data["merges"], data["merges_within_bars"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert TokenizerConfig.load(tmp_path / "tokenizer.json") == TokenizerConfig()


def test_learning_merges_is_deterministic_and_uses_the_training_songs_only(stores: dict[str, Path]) -> None:
    store = TokenStore(stores["multitrack"])
    first, read = learn_merges(store, store.config.vocab.size + MERGES)
    second, _ = learn_merges(store, store.config.vocab.size + MERGES)
    assert first == second and len(first) > MERGES // 2
    training = store.split_indices("train")
    assert 0 < len(training) < len(store)
    assert read == sum(int(np.sum(store.song(i).tokens > 2)) for i in training)  # bodies: no <sos>, <eos>
    assert TokenStore(stores["multitrack-bpe"]).config.merges == first
    _, capped = learn_merges(store, store.config.vocab.size + MERGES, max_tokens=read // 2)  # bounds the learner
    assert 0 < capped <= read // 2


def crossings(tokenizer: BpeTokenizer, store: TokenStore) -> tuple[int, int]:
    """How many merged tokens of the store's songs span two bars, and two steps."""
    bars = steps = 0
    for index in range(len(store)):
        base = tokenizer.base.with_positions(tokenizer.expand(store.song(index).tokens)[0], store.song(index).grid)
        _, firsts = tokenizer.expand(store.song(index).tokens)
        last = np.append(firsts[1:], len(base)) - 1
        bars += int((base.bars[last] != base.bars[firsts]).sum())
        steps += int((base.steps[last] != base.steps[firsts]).sum())
    return bars, steps


def test_merges_cross_timesteps_and_bars_unless_split_per_bar(stores: dict[str, Path], tmp_path: Path) -> None:
    across = TokenStore(stores["multitrack-bpe"])
    bars, steps = crossings(across.tokenizer, across)
    assert bars > 0 and steps > 0
    summary = train_store(stores["multitrack"], tmp_path / "bars", across.config.vocab.size, split_bars=True,
                          progress=False)
    within = TokenStore(summary.store)
    assert within.config.merges_within_bars and within.config.merges != across.config.merges
    bars, steps = crossings(within.tokenizer, within)
    assert bars == 0 and steps > 0  # still across onset groups inside a bar


def folded_by_hand(tokenizer: BpeTokenizer, state: tuple[int, int, int, int]):  # noqa: ANN201
    """Feed every token's base run, from `state`, through the base grammar (a lane per token): whether each is
    allowed, the state after it, its lead and advance, and the notes it completes (onset offset, pitch, length,
    program)."""
    tables = tokenizer.base.grammar
    lane = tables.on(torch.device("cpu"))
    size = tokenizer.vocab.size
    runs = [tokenizer.expand(np.array([token]))[0].tolist() for token in range(size)]
    current = torch.tensor([state] * size)
    allowed = torch.ones(size, dtype=torch.bool)
    lead, advance = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long)
    notes: list[list[tuple[int, ...]]] = [[] for _ in range(size)]
    for position in range(max(map(len, runs))):
        live = torch.tensor([token for token in range(size) if len(runs[token]) > position])  # (n,) runs this long
        tokens = torch.tensor([runs[token][position] for token in live.tolist()])
        allowed[live] &= torch.tensor([bool(tables.allowed(tuple(row[:3]), allow_end=False)[token])
                                       for row, token in zip(current[live].tolist(), tokens.tolist())])
        fed = lane.feed(current[live], tokens)
        if position == 0:
            lead = fed.lead.clone()
        for token, rows in zip(live.tolist(), fed.notes.tolist()):
            notes[token] += [(int(advance[token]) + offset, pitch, length, program)
                             for offset, pitch, length, program in rows if pitch >= 0]
        advance[live] += fed.advance
        current[live] = fed.state
    return allowed, current, lead, advance, notes


@pytest.mark.parametrize("name", ["multitrack", "single"])
def test_the_grammar_tables_equal_folding_each_token_through_the_base_grammar(stores: dict[str, Path], name: str) -> None:
    tokenizer = bpe_tokenizer(stores, name)
    grammar = tokenizer.grammar
    lane = grammar.on(torch.device("cpu"))
    rng = np.random.default_rng(0)
    size, base_size = tokenizer.vocab.size, tokenizer.base.vocab.size
    merged_allowed = 0
    for _ in range(16):  # random states, reachable or not
        instrument = int(rng.choice([0, DRUMS, *rng.integers(1, DRUMS, 3)])) if tokenizer.config.instruments else 0
        state = (int(rng.integers(len(PHASES) - 1)), int(rng.choice([NO_LOWEST, *rng.integers(0, NO_LOWEST, 3)])),
                 instrument, int(rng.integers(-1, 128)))
        mask = grammar.allowed(state[:3], allow_end=False)
        tensor_state = torch.tensor([state] * size)
        assert torch.equal(lane.allowed(tensor_state, False)[0], torch.from_numpy(mask))
        fed = lane.feed(tensor_state, torch.arange(size))
        allowed, after, lead, advance, notes = folded_by_hand(tokenizer, state)
        assert np.array_equal(mask, allowed.numpy()), state
        merged_allowed += int(mask[base_size:].sum())
        assert torch.equal(fed.state[allowed], after[allowed])
        assert torch.equal(fed.lead[allowed], lead[allowed]) and torch.equal(fed.advance[allowed], advance[allowed])
        for token in np.flatnonzero(mask).tolist():
            assert [tuple(row) for row in fed.notes[token].tolist() if row[1] >= 0] == notes[token], token
    assert merged_allowed > 0
    assert (grammar.tables.note_pitch == PENDING).any()  # some merged tokens start with the awaited note's duration


@pytest.mark.parametrize("name", ["multitrack", "single"])
def test_200_random_walks_through_the_lane_grammar_decode_to_the_notes_they_report(stores: dict[str, Path],
                                                                                  name: str) -> None:
    tokenizer = bpe_tokenizer(stores, name)
    lane = tokenizer.grammar.on(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    lanes, length = 200, 30
    state = torch.as_tensor(tokenizer.grammar.states([np.array([1])] * lanes))
    tokens = torch.zeros(lanes, length, dtype=torch.long)
    steps = torch.zeros(lanes, dtype=torch.long)
    reported: list[list[tuple[int, int, int, int]]] = [[] for _ in range(lanes)]
    for position in range(length):
        allowed = lane.allowed(state, allow_end=position == length - 1)
        sampled = torch.multinomial(allowed.float(), 1, generator=generator).squeeze(1)  # uniform over the allowed
        fed = lane.feed(state, sampled)
        for index in range(lanes):
            reported[index] += [(int(steps[index]) + offset, pitch, length_, program)
                                for offset, pitch, length_, program in fed.notes[index].tolist() if pitch >= 0]
        tokens[:, position], state, steps = sampled, fed.state, steps + fed.advance
    merged = sum(int((row >= tokenizer.base.vocab.size).sum()) for row in tokens)
    assert merged > lanes  # the walks take merged tokens
    for index in range(lanes):
        sequence = np.concatenate([[1], tokens[index].numpy()])
        assert tokenizer.grammar.check(sequence) is None
        score = tokenizer.decode(sequence)
        ticks = score.ticks_per_quarter // tokenizer.config.steps_per_quarter
        decoded = sorted((note.time // ticks, note.pitch, note.duration // ticks,
                          128 if track.is_drum else track.program * tokenizer.config.instruments)
                         for track in score.tracks for note in track.notes)
        assert decoded == sorted(reported[index]), index


def test_generate_batch_with_an_untrained_model_writes_grammatical_bpe_sequences(stores: dict[str, Path]) -> None:
    from midigen.inference import SamplingConfig, empty_prompt, generate_batch, load_prompt
    from midigen.inference.model_files import LoadedModel
    from midigen.model import ModelConfig, MusicTransformer

    tokenizer = bpe_tokenizer(stores, "multitrack")
    config = ModelConfig.preset("tiny", tokenizer.config)
    torch.manual_seed(0)
    model = MusicTransformer.for_tokenizer(config, tokenizer)
    loaded = LoadedModel(model, tokenizer.config, config, Path("."), 0)
    prompts = [empty_prompt(tokenizer), load_prompt(MULTITRACK[0], 2, tokenizer)]
    generations = generate_batch(loaded, prompts, SamplingConfig(seed=1), new_tokens=40, num_samples=2)
    for generation in generations:
        assert tokenizer.grammar.check(generation.sequence.tokens) is None
        assert tokenizer.decode(generation.sequence, generation.tempos, generation.grid).note_num() > 0


def test_tokenizer_train_and_roundtrip_from_the_command_line(stores: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    base = TokenStore(stores["single"])
    assert main(["tokenizer", "train", str(stores["single"]), "--vocab", str(base.config.vocab.size + 50),
                 "-o", str(store), "--quiet"]) == 0
    assert TokenStore(store).config.merges and "merged tokens" in capsys.readouterr().out
    out = tmp_path / "out.mid"
    assert main(["roundtrip", str(PROMPTS[0]), "-o", str(out), "--store", str(store)]) == 0
    tokenizer = TokenStore(store).tokenizer
    import symusic

    assert notes_of(symusic.Score(str(out))) == notes_of(tokenizer.decode(tokenizer.encode(PROMPTS[0])))
    assert main(["tokenizer", "train", str(store), "--vocab", "1000", "-o", str(tmp_path / "again")]) == 2
    assert "already holds merged tokens" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["multitrack", "single"])
def test_merged_tokens_count_the_pitch_classes_and_octaves_of_every_note_they_hold(stores: dict[str, Path],
                                                                                  name: str) -> None:
    tokenizer = bpe_tokenizer(stores, name)
    counts, first = tokenizer.token_value_counts(), tokenizer.token_lookups()
    merged = np.arange(tokenizer.vocab.size) >= tokenizer.base.vocab.size
    for path in PROMPTS[:3] + (MULTITRACK if name == "multitrack" else []):
        sequence = tokenizer.encode(path)
        pitches = np.array([note.pitch for track in tokenizer.decode(sequence).tracks if not track.is_drum
                            for note in track.notes], dtype=np.int64)
        for feature, values in (("pitch_classes", 1 + pitches % 12), ("octaves", 1 + pitches // 12)):
            table = counts[feature]
            assert np.array_equal(table.sum(axis=1) >= 1, np.ones(len(table), dtype=bool))
            summed = table[sequence.tokens].sum(axis=0)  # (values,) notes at each value over the song
            expected = np.bincount(values, minlength=table.shape[1])
            assert np.array_equal(summed[1:], expected[1:]), (path.name, feature)
            # "first" takes one of the counted values: the first note's
            rows = table[np.arange(len(table)), first[feature]]
            assert (rows >= 1).all()
    holds_several = counts["pitch_classes"][:, 1:].sum(axis=1) > 1
    assert (holds_several & merged).any() and not (holds_several & ~merged).any()
    base = tokenizer.base.token_lookups()
    for feature, lookup in first.items():  # the value of each token's first base token that has one
        runs = (tokenizer.flat[tokenizer.starts[token] : tokenizer.starts[token + 1]] for token in range(len(lookup)))
        assert lookup.tolist() == [next((base[feature][b] for b in run if base[feature][b]), 0) for run in runs]


def test_a_model_summing_merged_notes_trains_saves_and_loads_with_its_weights(stores: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    from midigen.inference import load_model

    run = tmp_path / "run"
    assert main(["train", str(stores["single-bpe"]), "-o", str(run), "--preset", "tiny", "--pitch-features",
                 "--merged-notes", "sum", "--max-steps", "2", "--device", "cpu", "--quiet"]) == 0
    loaded = load_model(run, "cpu")
    assert loaded.model_config.merged_notes == "sum"
    tokenizer = load_tokenizer(loaded.tokenizer)
    for feature, table in tokenizer.token_value_counts().items():
        buffer = loaded.model.lookups.get_buffer(feature).numpy()
        assert np.array_equal(buffer[:, : table.shape[1]], table)
    with pytest.raises(SystemExit):
        main(["train", str(stores["single-bpe"]), "-o", str(tmp_path / "bad"), "--merged-notes", "mean"])


def test_encode_with_bpe_writes_the_base_store_and_the_merged_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    vocab = SINGLE_STREAM.vocab.size + 40
    assert main(["encode", str(DATA / "prompts"), "-o", str(store), "--single-stream", "--bpe", str(vocab),
                 "--workers", "1", "--quiet"]) == 0
    merged, base = TokenStore(store), TokenStore(tmp_path / "store-base")
    assert merged.config.vocab.size <= vocab and replace(merged.config, merges=()) == base.config
    assert len(merged) == len(base) == len(PROMPTS)


def test_merged_ids_travel_as_sequences_of_earlier_tokens() -> None:
    config = replace(SINGLE_STREAM, merges=((4, 132), (388, 388)))
    tokenizer = load_tokenizer(config)
    assert isinstance(tokenizer, BpeTokenizer)
    expanded, _ = tokenizer.expand(np.array([389]))
    assert expanded.tolist() == [4, 132, 4, 132]
    assert config.vocab.describe([388, 389]) == ["m0", "m1"]
    from midigen.errors import MidigenError

    with pytest.raises(MidigenError, match="not yet defined"):
        replace(SINGLE_STREAM, merges=((4, 389),))
    with pytest.raises(MidigenError, match="pairs of token ids"):
        TokenizerConfig.from_dict({"merges": [[4, 132, 5]]})
    grid = tokenizer.base.encode(PROMPTS[0]).grid
    placed = tokenizer.with_positions(np.array([1, 389, 3, 132]), grid)  # <sos> (n0 d1 n0 d1) <sep> d1
    assert isinstance(placed, TokenSequence) and placed.steps.tolist() == [0, 0, 0, 1]
