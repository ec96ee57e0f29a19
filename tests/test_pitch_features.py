"""Pitch-class and octave features: derived from token ids by the tokenizer's lookups, embedded by the model without
being stored or passed, rebuilt (not saved) when a model is loaded, and consistent under transposition."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, PROMPTS, SINGLE_STREAM
from test_training import interrupt_at_batch

from midigen.codec import TokenizerConfig
from midigen.codec.registry import load_tokenizer
from midigen.data.batching import RandomChunks, TokenArrays, draw_shifts, transpose_notes
from midigen.data.store import open_finished_store
from midigen.errors import MidigenError
from midigen.inference.export import export_model
from midigen.inference.generate import empty_prompt, generate
from midigen.inference.model_files import CHECKPOINT_FILE, load_model
from midigen.inference.sampling import SamplingConfig
from midigen.model import ModelConfig, MusicTransformer
from midigen.state_files import load_state
from midigen.training.config import TrainConfig
from midigen.training.recipe import train

DERIVED = ("pitch_classes", "octaves")
MODEL = ModelConfig.preset("tiny", SINGLE_STREAM, derived_features=True)


def train_config(**overrides: object) -> TrainConfig:
    settings = dict(max_steps=4, batch_size=2, eval_interval=4, log_interval=1, warmup_steps=1, eval_tokens=512,
                    device="cpu")
    return TrainConfig(**(settings | overrides))


def pitches_of(lookups: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """The pitch each token's derived features name, −1 where they name none."""
    pitch_class, octave = lookups["pitch_classes"][tokens], lookups["octaves"][tokens]
    return np.where(pitch_class > 0, 12 * (octave - 1) + pitch_class - 1, -1)


@pytest.mark.parametrize("config, files", [(SINGLE_STREAM, PROMPTS[:4]),
                                           (TokenizerConfig(), sorted((DATA / "multitrack").glob("*.mid")))],
                         ids=["single-stream", "multitrack"])
def test_lookups_name_the_pitch_of_every_note_of_real_midi(config: TokenizerConfig, files: list[Path]) -> None:
    tokenizer = load_tokenizer(config)
    lookups = tokenizer.token_lookups()
    assert set(lookups) == set(DERIVED)
    assert (lookups["pitch_classes"] > 0).tolist() == (lookups["octaves"] > 0).tolist()
    drums_seen = 0
    for path in files:
        sequence = tokenizer.encode(path)
        score = tokenizer.decode(sequence)
        pitched = sorted(note.pitch for track in score.tracks if not track.is_drum for note in track.notes)
        named = pitches_of(lookups, sequence.tokens)
        assert sorted(named[named >= 0].tolist()) == pitched, path.name  # drum hits and all else name no pitch
        drums_seen += sum(len(track.notes) for track in score.tracks if track.is_drum)
    assert drums_seen > 0 or not config.keep_drums  # the multi-track files do have drum hits, which carry nothing


def test_derived_features_equal_passing_them() -> None:
    tokenizer = load_tokenizer(SINGLE_STREAM)
    lookups = tokenizer.token_lookups()
    torch.manual_seed(0)
    derived = MusicTransformer(MODEL, MODEL.derived_weights(tokenizer)).eval()
    assert not any(name.startswith("lookups") for name in derived.state_dict())  # rebuilt from the tokenizer
    passed = MusicTransformer(replace(MODEL, embeddings=MODEL.embeddings | MODEL.derived_embeddings,
                                      derived_embeddings={})).eval()
    passed.load_state_dict(derived.state_dict())
    sequence = tokenizer.encode(PROMPTS[0])
    tokens = torch.as_tensor(sequence.tokens[:48]).view(2, 24)  # (B, T)
    grid = {name: torch.as_tensor(sequence.features[name][:48]).view(2, 24) for name in MODEL.embeddings}
    explicit = grid | {name: torch.as_tensor(lookups[name])[tokens] for name in DERIVED}
    with torch.no_grad():
        expected = passed(tokens, explicit).logits
        torch.testing.assert_close(derived(tokens, grid).logits, expected, atol=0, rtol=0)
        # the cached path of generation derives them too, token by token
        prefix = derived(tokens[:, :20], {name: value[:, :20] for name, value in grid.items()})
        step = derived(tokens[:, 20:], {name: value[:, 20:] for name, value in grid.items()}, past=prefix.present)
        torch.testing.assert_close(step.logits, expected[:, 20:], atol=1e-5, rtol=0)
        no_pitch = passed(tokens, explicit | {name: torch.zeros_like(tokens) for name in DERIVED}).logits
    assert not torch.allclose(no_pitch, expected, atol=1e-4)  # the features do reach the output


def test_a_model_deriving_features_needs_their_lookups() -> None:
    with pytest.raises(MidigenError, match="pitch_classes"):
        MusicTransformer(MODEL)
    weights = MODEL.derived_weights(load_tokenizer(SINGLE_STREAM))
    for wrong in (np.ones((MODEL.vocab_size, 13), dtype=np.float32), np.ones((MODEL.vocab_size - 1, 12))):
        with pytest.raises(MidigenError, match="octaves"):
            MusicTransformer(MODEL, weights | {"octaves": wrong})
    assert MODEL.derived_embeddings == {"pitch_classes": 13, "octaves": 12}  # pitches 120-127: octave 11
    assert ModelConfig.from_saved(MODEL.to_dict()) == MODEL
    saved_before = ModelConfig.preset("tiny", SINGLE_STREAM).to_dict()
    del saved_before["derived_embeddings"], saved_before["merged_notes"]
    # a model saved before merged tokens' features took the sum over their notes took its first note's
    before = replace(ModelConfig.preset("tiny", SINGLE_STREAM), merged_notes="first")
    assert ModelConfig.from_saved(saved_before) == before


def test_transposition_keeps_derived_features_consistent(prompt_store: Path) -> None:
    store = open_finished_store(prompt_store)
    lookups = store.tokenizer.token_lookups()
    data = TokenArrays(store, "cpu")
    batch = next(iter(RandomChunks(data, list(range(len(store))), 64, 8, seed=3)))
    tokens = batch["tokens"]  # (B, T + 1)
    pitch = data.transposable[tokens.numpy()]  # (B, T + 1), −1 for every token but a note
    lowest = np.where(pitch >= 0, pitch, 128).min(1)
    highest = pitch.max(1)
    shifts = draw_shifts(lowest, highest, 6, np.random.default_rng(0))
    assert np.any(shifts != 0)
    moved = transpose_notes(tokens, shifts, data.transposable).numpy()
    expected = np.where(pitch >= 0, pitch + shifts[:, None], -1)
    assert (pitches_of(lookups, moved) == expected).all()
    assert (pitches_of(lookups, tokens.numpy()) == pitch).all()


@pytest.fixture(scope="module")
def pitch_run(prompt_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pitch") / "run"
    result, _ = train(prompt_store, run, MODEL, train_config(), progress=False)
    assert result.step == 4
    return run


def test_trained_model_saves_loads_and_generates_the_same(pitch_run: Path, tmp_path: Path) -> None:
    _, tensors = load_state(pitch_run / CHECKPOINT_FILE)
    assert not any("lookups" in name for name in tensors)  # the weights file holds weights only
    exported = export_model(pitch_run, tmp_path / "model")
    from_run, from_folder = load_model(pitch_run, "cpu"), load_model(exported, "cpu")
    assert from_folder.model_config.derived_embeddings == MODEL.derived_embeddings
    for name, weight in from_run.model.state_dict().items():
        torch.testing.assert_close(from_folder.model.state_dict()[name], weight, atol=0, rtol=0)
    tokenizer = load_tokenizer(SINGLE_STREAM)
    generations = [generate(loaded, empty_prompt(tokenizer), SamplingConfig(seed=5), new_tokens=24)
                   for loaded in (from_run, from_folder)]
    assert len(generations[0].sequence) > 1
    np.testing.assert_array_equal(generations[0].sequence.tokens, generations[1].sequence.tokens)


def test_a_run_with_pitch_features_resumes_exactly(pitch_run: Path, prompt_store: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = pitch_run, tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, RandomChunks, 2)
        first, _ = train(prompt_store, resumed, MODEL, train_config(), progress=False)
    assert first.interrupted and first.step == 2
    second, _ = train(prompt_store, resumed, None, None, resume=True, progress=False)
    assert second.step == 4
    a, b = load_model(straight, "cpu").model.state_dict(), load_model(resumed, "cpu").model.state_dict()
    assert set(a) == set(b) and {"feature_emb.pitch_classes.weight", "feature_emb.octaves.weight"} <= set(a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
