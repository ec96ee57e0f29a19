"""The tokenizer interface: files of midigen 0.2 still open as the single-stream seed codec, the registry, the
grammar as tables (numpy and torch agree), features as data, and no token arithmetic outside the codec."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from midigen.cli.main import main
from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.grammar import PHASES
from midigen.data.store import TokenStore
from midigen.errors import MidigenError
from midigen.inference import SamplingConfig, empty_prompt, generate, load_model, load_prompt
from midigen.inference.model_files import read_config

DATA = Path(__file__).parent / "data"
FORMAT_1 = DATA / "format1"
SRC = Path(__file__).parents[1] / "src" / "midigen"
MULTITRACK = sorted((DATA / "multitrack").glob("*.mid"))


def test_a_store_of_midigen_0_2_opens_as_the_single_stream_seed_codec() -> None:
    store = TokenStore(FORMAT_1 / "store")
    assert store.config == TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)
    assert store.config.kind == "seed" and len(store) == 4
    song = store.song(0)
    assert set(song.features) == {"bars", "beats"} and song.tokens[0] == 1
    # the single stream's ids are those of 0.2: the store's tokens decode to the notes of the file they came from
    tokenizer = load_tokenizer(store.config)
    again = tokenizer.encode(DATA / "prompts" / Path(store.songs[0].path).name)
    assert np.array_equal(again.tokens, song.tokens) and np.array_equal(again.bars, song.bars)


@pytest.mark.parametrize("folder", ["run", "model"])
def test_run_and_model_folders_of_midigen_0_2_generate_what_0_2_generated(folder: str) -> None:
    expected = json.loads((FORMAT_1 / "generated_by_0.2.0.json").read_text())
    loaded = load_model(FORMAT_1 / folder, "cpu")
    assert loaded.tokenizer.instruments is False and set(loaded.model_config.embeddings) == {"bars", "beats"}
    tokenizer = load_tokenizer(loaded.tokenizer)
    sampling = SamplingConfig(temperature=expected["temperature"], seed=expected["seed_empty"])
    generation = generate(loaded, empty_prompt(tokenizer), sampling, new_tokens=expected["new_tokens"])
    assert generation.sequence.tokens.tolist() == expected["tokens"]["empty_prompt"]
    prompt = load_prompt(DATA / "prompts" / expected["prompt"], expected["prompt_bars"], tokenizer)
    sampling = SamplingConfig(temperature=expected["temperature"], seed=expected["seed_canon"])
    generation = generate(loaded, prompt, sampling, new_tokens=expected["new_tokens"])
    assert generation.sequence.tokens.tolist() == expected["tokens"]["canon_2_bars"]


def test_a_run_of_midigen_0_2_resumes_on_its_store_and_is_then_written_in_todays_format(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, store = tmp_path / "run", tmp_path / "store"
    shutil.copytree(FORMAT_1 / "run", run)
    shutil.copytree(FORMAT_1 / "store", store)
    assert main(["train", str(store), "-o", str(run), "--resume", "--max-steps", "5", "--quiet"]) == 0
    config = read_config(run)
    assert json.loads((run / "config.json").read_text())["format"] == 2
    assert config["tokenizer"] == TokenStore(store).config
    assert load_model(run, "cpu").step == 5


def test_resume_refuses_a_store_encoded_with_another_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(FORMAT_1 / "run", run)
    other = tmp_path / "other"
    prompts = sorted((DATA / "prompts").glob("*.mid"))[:4]
    assert main(["encode", *map(str, prompts), "-o", str(other), "--single-stream", "--max-duration", "128"]) == 0
    code = main(["train", str(other), "-o", str(run), "--resume", "--max-steps", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "another tokenizer" in err and "max_duration: 256 → 128" in err, err


def test_the_registry_builds_tokenizers_by_kind() -> None:
    assert type(load_tokenizer(TokenizerConfig())).__name__ == "SeedTokenizer"
    with pytest.raises(MidigenError, match="unknown tokenizer kind"):
        TokenizerConfig.from_dict({"kind": "no-such-codec"})
    with pytest.raises(MidigenError, match="velocity_bins needs instruments"):
        TokenizerConfig(instruments=False, velocity_bins=8)


def test_no_token_arithmetic_and_no_seed_tokenizer_outside_the_codec() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC).as_posix()
        text = path.read_text()
        if relative != "codec/registry.py" and "SeedTokenizer(" in text:
            offenders.append(f"{relative}: SeedTokenizer(")
        if not relative.startswith("codec/") and re.search(r"\bids_of\([^)]*\)\.(start|stop)|\b(note|duration|instrument|hit|velocity)_offset\b", text):
            offenders.append(f"{relative}: token id arithmetic")
    assert not offenders, offenders


def tokenizers() -> list[TokenizerConfig]:
    single = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)
    return [single, replace(single, merge_unisons=False), TokenizerConfig(), replace(TokenizerConfig(), velocity_bins=0),
            replace(TokenizerConfig(), merge_unisons=False)]


@pytest.mark.parametrize("config", tokenizers(), ids=lambda c: f"instruments={c.instruments},velocity={c.velocity_bins},"
                                                               f"merge={c.merge_unisons}")
def test_the_grammar_accepts_real_songs_and_its_torch_tables_agree_with_numpy(config: TokenizerConfig,
                                                                             prompt_files: list[Path]) -> None:
    tokenizer = load_tokenizer(config)
    tables = tokenizer.grammar
    device = tables.on(torch.device("cpu"))
    files = prompt_files + (MULTITRACK if config.instruments else [])
    for path in files:
        sequence = tokenizer.encode(path)
        assert tables.check(sequence.tokens) is None, path
        if config.instruments:  # the feature the generator derives from the grammar is the encoder's
            assert np.array_equal(tables.instrument_features(sequence.tokens), sequence.features["instruments"]), path
        state = tables.start
        lane = torch.as_tensor(tables.states([sequence.tokens[:1]]))  # (1, 4)
        steps = 0
        for token in sequence.tokens[1:].tolist():
            assert torch.equal(device.allowed(lane, True)[0], torch.from_numpy(tables.allowed(state, True)))
            state = tables.feed(state, token)
            fed = device.feed(lane, torch.tensor([token]))
            lane = fed.state
            steps += int(fed.advance)
            assert tuple(lane[0, :3].tolist()) == state
        assert PHASES[state[0]] == "end"
        assert steps == int(sequence.steps[-1])  # time moves on by the gaps alone
