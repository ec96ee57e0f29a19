"""Generation with instruments: a model trained on a multi-track store continues multi-track prompts, every sampled
sequence decodes at any temperature, and `--instruments` restricts what the continuation plays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

from midigen.cli.main import main
from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.multitrack import decode_multitrack
from midigen.inference import SamplingConfig, TokenEvent, empty_prompt, generate, generate_batch, load_model, load_prompt
from midigen.inference.generate import write_generation

DATA = Path(__file__).parent / "data"
BAND = DATA / "multitrack" / "230_bpm_multitrack.mid"


@pytest.fixture(scope="module")
def band_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained a few steps on a multi-track store: the real band, orchestra and drum files and the
    prompts, instruments, drums and velocities kept (the default encoding)."""
    from midigen.data.encode import encode_files
    from midigen.model import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.training.recipe import train

    root = tmp_path_factory.mktemp("band")
    encode_files([DATA / "multitrack", DATA / "prompts"], root / "store", workers=2, progress=False)
    train(root / "store", root / "run", ModelConfig.preset("tiny", TokenizerConfig()),
          TrainConfig(max_steps=40, batch_size=4, eval_interval=20, warmup_steps=5, device="cpu"), progress=False)
    return root / "run"


def continuation_instruments(generation, tokenizer) -> set[int]:  # noqa: ANN001
    notes = decode_multitrack(generation.sequence.tokens, tokenizer.config)
    return set(notes.instruments[notes.steps >= generation.continuation_step].tolist())


def test_a_multitrack_prompt_is_continued_with_the_instruments_asked_for(band_run: Path, tmp_path: Path) -> None:
    loaded = load_model(band_run, "cpu")
    assert loaded.tokenizer.instruments and "instruments" in loaded.model_config.embeddings
    tokenizer = load_tokenizer(loaded.tokenizer)
    prompt = load_prompt(BAND, 16, tokenizer)  # its drums come in at bar 16
    prompt_instruments = set(decode_multitrack(prompt.sequence.tokens, tokenizer.config).instruments.tolist())
    assert len(prompt_instruments) >= 2 and 128 in prompt_instruments  # a band with drums
    asked = (0, 33, 128)
    generation = generate(loaded, prompt, SamplingConfig(seed=4), bars=8, instruments=asked)
    played = continuation_instruments(generation, tokenizer)
    assert played and played <= set(asked), played
    score = write_generation(generation, tokenizer, tmp_path / "band.mid")
    back = symusic.Score(str(tmp_path / "band.mid"))
    assert len(back.tracks) >= 2 and any(track.is_drum for track in back.tracks)
    assert {track.program for track in back.tracks if not track.is_drum} >= {key for key in prompt_instruments if key < 128}
    assert back.note_num() == score.note_num() > 0


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6, 5.0])
def test_200_random_generations_decode_and_respect_the_instruments(band_run: Path, temperature: float) -> None:
    loaded = load_model(band_run, "cpu")
    tokenizer = load_tokenizer(loaded.tokenizer)
    grammar = tokenizer.grammar
    choices = [None, (0,), (128,), (0, 33, 128), (40, 41, 42)]
    prompts = [empty_prompt(tokenizer), load_prompt(BAND, 1, tokenizer)]
    for number, chosen in enumerate(choices):
        generations = generate_batch(loaded, prompts, SamplingConfig(temperature=temperature, top_p=0.95, seed=number),
                                     new_tokens=60, num_samples=4, instruments=chosen)
        for generation in generations:  # 5 temperatures × 5 choices × 8 lanes = 200
            tokens = generation.sequence.tokens
            assert grammar.check(tokens) is None
            notes = decode_multitrack(tokens, tokenizer.config)
            new = notes.steps >= generation.continuation_step
            if chosen is not None:
                played = set(notes.instruments[new].tolist()) - set(
                    decode_multitrack(tokens[: generation.prompt_length], tokenizer.config).instruments.tolist())
                assert played <= set(chosen), (chosen, played)
            score = tokenizer.decode(generation.sequence, generation.tempos, generation.grid)
            assert symusic.Score.from_midi(score.dumps_midi()).note_num() == score.note_num()


def test_streamed_notes_are_the_notes_of_the_continuation(band_run: Path) -> None:
    loaded = load_model(band_run, "cpu")
    tokenizer = load_tokenizer(loaded.tokenizer)
    events: list[TokenEvent] = []
    generation = generate(loaded, load_prompt(BAND, 1, tokenizer), SamplingConfig(seed=2), new_tokens=120,
                          on_token=events.append)
    streamed = sorted((note.step, note.pitch, note.length if note.instrument != 128 else 1, note.instrument)
                      for event in events for note in event.notes)
    notes = decode_multitrack(generation.sequence.tokens, tokenizer.config)
    prompt_notes = decode_multitrack(generation.sequence.tokens[: generation.prompt_length], tokenizer.config)
    decoded = sorted(set(zip(notes.steps.tolist(), notes.pitches.tolist(), notes.durations.tolist(),
                             notes.instruments.tolist()))
                     - set(zip(prompt_notes.steps.tolist(), prompt_notes.pitches.tolist(),
                               prompt_notes.durations.tolist(), prompt_notes.instruments.tolist())))
    assert streamed and set(streamed) >= set(decoded)  # a streamed unison of an earlier note merges on decoding
    steps = np.array([event.step for event in events])
    assert (np.diff(steps) >= 0).all()


def test_instruments_are_refused_for_a_single_stream_model_and_when_unknown(
        band_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single = DATA / "format1" / "model"
    out = str(tmp_path / "x.mid")
    for folder, instruments, reason in ((single, "0,33", "keeps no instruments"),
                                        (band_run, "0,kazoo-orchestra", "kazoo-orchestra")):
        code = main(["generate", str(folder), "--tokens", "8", "--instruments", instruments, "-o", out])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
