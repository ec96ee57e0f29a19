"""Shared fixtures: real MIDI files, a token store made from them, and a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import pytest

from midigen.codec import TokenizerConfig

# The seed's single-stream codec without drums or velocities (the defaults before midigen 0.3): what every test that
# does not test the multi-track codec encodes with.
SINGLE_STREAM = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)

DATA = Path(__file__).parent / "data"
PROMPTS = sorted((DATA / "prompts").glob("*.mid"))


@pytest.fixture(scope="session")
def prompt_files() -> list[Path]:
    return PROMPTS


@pytest.fixture(scope="session")
def prompt_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 19 real prompt excerpts encoded into a token store."""
    from midigen.data.encode import encode_files

    root = tmp_path_factory.mktemp("store") / "prompts"
    encode_files([DATA / "prompts"], root, SINGLE_STREAM, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, prompt_store: Path) -> Path:
    """A tiny model trained for a few steps on the prompt store."""
    from midigen.model import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.training.recipe import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    model_config = ModelConfig.preset("tiny", SINGLE_STREAM)
    train_config = TrainConfig(max_steps=30, batch_size=4, eval_interval=15, log_interval=5, warmup_steps=5, device="cpu")
    train(prompt_store, run, model_config, train_config, progress=False)
    return run
