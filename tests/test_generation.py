"""Generation: grammar-valid output at any temperature, prompts, markers, and bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import symusic

from midigen.codec import SeedTokenizer, TokenizerConfig
from midigen.codec.midi_io import CONTINUATION_MARKER
from midigen.inference.generate import empty_prompt, generate, generation_score, load_prompt
from midigen.inference.grammar import Grammar
from midigen.inference.sampling import SamplingConfig
from midigen.inference.model_files import load_model

TOKENIZER = SeedTokenizer(TokenizerConfig())
FUER_ELISE = Path(__file__).parent / "data" / "prompts" / "Fuer_Elise_-_Ludwig_Van_Beethoven_-_Verse.mid"


def test_real_songs_follow_the_grammar(prompt_files: list[Path]) -> None:
    grammar = Grammar(TOKENIZER.config)
    for path in prompt_files:
        assert grammar.check(TOKENIZER.encode(path).tokens) is None, path


def test_grammar_rejects_what_cannot_decode() -> None:
    vocab, grammar = TOKENIZER.vocab, Grammar(TOKENIZER.config)
    note, dur = vocab.note(60), vocab.duration(4)
    assert grammar.check([1, note, note]) == 2  # a note needs its duration
    assert grammar.check([1, note, dur, vocab.note(64)]) == 3  # a group goes from high to low pitch
    assert grammar.check([1, 3, note]) == 2  # a gap needs its length
    assert grammar.check([1, 3, vocab.duration(4), 3]) == 3  # only a full-length gap may be continued
    assert grammar.check([1, 3, vocab.duration(256), 3, dur, note, dur, 2]) is None


def test_grammar_repeats_a_pitch_only_where_unisons_are_kept(prompt_files: list[Path]) -> None:
    vocab = TOKENIZER.vocab
    top, dur = vocab.note(127), vocab.duration(4)
    keeping = TokenizerConfig(merge_unisons=False)
    assert Grammar(TOKENIZER.config).check([1, top, dur, top, dur]) == 3
    assert Grammar(keeping).check([1, top, dur, top, dur]) is None
    assert Grammar(keeping).check([1, vocab.note(60), dur, vocab.note(61)]) == 3  # still from high to low
    assert Grammar(keeping).check([1, dur]) == 1  # a group starts with a note, not a duration
    tokenizer = SeedTokenizer(keeping)
    for path in prompt_files:
        assert Grammar(keeping).check(tokenizer.encode(path).tokens) is None, path


def test_200_generations_decode_to_midi_with_notes(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    grammar = Grammar(TOKENIZER.config)
    rng = np.random.default_rng(0)
    settings = [SamplingConfig(temperature=float(t), seed=i) for i, t in enumerate(rng.uniform(0.1, 5.0, 196))]
    settings += [SamplingConfig(temperature=0.1, seed=1), SamplingConfig(temperature=5.0, seed=2),
                 SamplingConfig(top_k=1, seed=3), SamplingConfig(top_p=0.5, seed=4)]
    for sampling in settings:
        generation = generate(trained, empty_prompt(TOKENIZER), sampling, new_tokens=12)
        assert grammar.check(generation.sequence.tokens) is None, sampling
        score = symusic.Score.from_midi(generation_score(generation, TOKENIZER).dumps_midi())
        assert score.note_num() >= 1, sampling


def test_same_seed_same_music(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    runs = [generate(trained, empty_prompt(TOKENIZER), SamplingConfig(seed=7), new_tokens=30) for _ in range(2)]
    assert np.array_equal(runs[0].sequence.tokens, runs[1].sequence.tokens)


def test_continuation_keeps_the_prompt_and_marks_where_it_starts(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    prompt = load_prompt(FUER_ELISE, 2, TOKENIZER)
    generation = generate(trained, prompt, SamplingConfig(seed=0), bars=2)
    score = generation_score(generation, TOKENIZER)
    bar_steps = 24  # 3/4 at 8 steps per quarter
    assert prompt.end_step == 2 * bar_steps
    (marker,) = score.markers
    assert marker.text == CONTINUATION_MARKER and marker.time == generation.continuation_step * 60
    assert generation.continuation_step <= 2 * bar_steps
    original = symusic.Score(FUER_ELISE)
    assert (score.time_signatures[0].numerator, score.time_signatures[0].denominator) == (3, 4)
    assert score.tempos[0].qpm == pytest.approx(original.tempos[0].qpm, rel=1e-3)
    expected = {n for n in TOKENIZER.sparse_score(FUER_ELISE).notes() if n[0] < 2 * bar_steps}
    decoded = TOKENIZER.sparse_score(score).notes()
    assert expected and expected <= decoded
    new_onsets = [n[0] for n in decoded - expected]
    assert new_onsets and min(new_onsets) == generation.continuation_step and max(new_onsets) < 4 * bar_steps


def test_prompt_longer_than_the_context_slides(tiny_run: Path, prompt_files: list[Path]) -> None:
    trained = load_model(tiny_run)
    longest = max(prompt_files, key=lambda p: len(TOKENIZER.encode(p)))
    prompt = load_prompt(longest, 100, TOKENIZER)
    assert len(prompt.sequence) > trained.model_config.context
    generation = generate(trained, prompt, SamplingConfig(seed=0), new_tokens=2 * trained.model_config.context)
    assert Grammar(TOKENIZER.config).check(generation.sequence.tokens) is None


def midigen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midigen", *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_a_continuation_with_its_picture_and_sound(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mid"
    audio = ["--wav"] if shutil.which("fluidsynth") else []
    done = midigen("generate", str(tiny_run), "--prompt", str(FUER_ELISE), "--prompt-bars", "2", "--bars", "2",
                   "--seed", "1", "--top-p", "0.9", "-o", str(out), "--png", *audio)
    assert done.returncode == 0, done.stderr
    assert symusic.Score(out).note_num() > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    if audio:
        assert out.with_suffix(".wav").read_bytes()[:4] == b"RIFF"


def bad_inputs(tiny_run: Path, tmp_path: Path) -> list[tuple[str, list[str], str]]:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    (corrupt / "checkpoint.safetensors").write_bytes((tiny_run / "checkpoint.safetensors").read_bytes()[:1000])
    text = tmp_path / "text.mid"
    text.write_text("not midi at all")
    silent = tmp_path / "silent.mid"
    empty = symusic.Score(480)
    empty.tempos.append(symusic.Tempo(0, 100.0))
    empty.dump_midi(silent)
    out = str(tmp_path / "x.mid")
    run = str(tiny_run)
    return [
        ("missing checkpoint", [str(tmp_path / "nope"), "--bars", "1", "-o", out], "no such run or model folder"),
        ("corrupt checkpoint", [str(corrupt), "--bars", "1", "-o", out], "not a safetensors file"),
        ("prompt is not MIDI", [run, "--prompt", str(text), "--bars", "1", "-o", out], "not a MIDI file"),
        ("prompt without notes", [run, "--prompt", str(silent), "--bars", "1", "-o", out], "no notes"),
        ("zero prompt bars", [run, "--prompt", str(FUER_ELISE), "--prompt-bars", "0", "--bars", "1", "-o", out],
         "--prompt-bars"),
        ("negative temperature", [run, "--temperature", "-0.5", "--bars", "1", "-o", out], "temperature"),
    ]


def test_cli_bad_input_is_one_line_and_exit_2(tiny_run: Path, tmp_path: Path) -> None:
    for name, args, message in bad_inputs(tiny_run, tmp_path):
        done = midigen("generate", *args)
        assert done.returncode == 2, (name, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
    assert not (tmp_path / "x.mid").exists()
