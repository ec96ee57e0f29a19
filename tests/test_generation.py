"""Generation: grammar-valid output at any temperature, prompts, markers, and bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import SINGLE_STREAM

from midigen.codec import GrammarTables, load_tokenizer
from midigen.cli.main import main
from midigen.codec.midi_io import CONTINUATION_MARKER
from midigen.errors import BadMidiError, MidigenError
from midigen.evaluation.render import find_fluidsynth, find_soundfont
from midigen.inference.generate import empty_prompt, generate, generate_batch, generation_score, load_prompt
from midigen.inference.sampling import SamplingConfig
from midigen.inference.model_files import load_model

TOKENIZER = load_tokenizer(SINGLE_STREAM)
FUER_ELISE = Path(__file__).parent / "data" / "prompts" / "Fuer_Elise_-_Ludwig_Van_Beethoven_-_Verse.mid"


def test_real_songs_follow_the_grammar(prompt_files: list[Path]) -> None:
    grammar = TOKENIZER.grammar
    for path in prompt_files:
        assert grammar.check(TOKENIZER.encode(path).tokens) is None, path


def test_grammar_rejects_what_cannot_decode() -> None:
    vocab, grammar = TOKENIZER.vocab, TOKENIZER.grammar
    note, dur = vocab.note(60), vocab.duration(4)
    assert grammar.check([1, note, note]) == 2  # a note needs its duration
    assert grammar.check([1, note, dur, vocab.note(64)]) == 3  # a group goes from high to low pitch
    assert grammar.check([1, 3, note]) == 2  # a gap needs its length
    assert grammar.check([1, 3, vocab.duration(4), 3]) == 3  # only a full-length gap may be continued
    assert grammar.check([1, 3, vocab.duration(256), 3, dur, note, dur, 2]) is None


def test_grammar_repeats_a_pitch_only_where_unisons_are_kept(prompt_files: list[Path]) -> None:
    vocab = TOKENIZER.vocab
    top, dur = vocab.note(127), vocab.duration(4)
    keeping = replace(SINGLE_STREAM, merge_unisons=False)
    assert TOKENIZER.grammar.check([1, top, dur, top, dur]) == 3
    assert GrammarTables(keeping).check([1, top, dur, top, dur]) is None
    assert GrammarTables(keeping).check([1, vocab.note(60), dur, vocab.note(61)]) == 3  # still from high to low
    assert GrammarTables(keeping).check([1, dur]) == 1  # a group starts with a note, not a duration
    tokenizer = load_tokenizer(keeping)
    for path in prompt_files:
        assert GrammarTables(keeping).check(tokenizer.encode(path).tokens) is None, path


def test_200_generations_decode_to_midi_with_notes(tiny_run: Path) -> None:
    """Greedy, a temperature so small that dividing by it overflows, cold to very hot, top-k and top-p: 20 lanes of
    80 tokens each, from nothing and from a real prompt."""
    trained = load_model(tiny_run)
    grammar = TOKENIZER.grammar
    settings = [SamplingConfig(temperature=t, seed=i) for i, t in enumerate((0.0, 1e-45, 1e-5, 0.1, 1.0, 2.0, 5.0))]
    settings += [SamplingConfig(top_k=1, seed=8), SamplingConfig(top_p=0.5, seed=9),
                 SamplingConfig(temperature=3.0, top_k=20, top_p=0.9, seed=10)]
    prompts = [empty_prompt(TOKENIZER), load_prompt(FUER_ELISE, 2, TOKENIZER)]
    batches = [generate_batch(trained, prompts, sampling, new_tokens=80, num_samples=10) for sampling in settings]
    assert sum(len(batch) for batch in batches) == 200
    for sampling, batch in zip(settings, batches):
        for generation in batch:
            assert len(generation.sequence) - generation.prompt_length == 80
            assert grammar.check(generation.sequence.tokens) is None, sampling
            score = symusic.Score.from_midi(generation_score(generation, TOKENIZER).dumps_midi())
            assert score.note_num() >= 1, sampling
    for greedy, tiny in zip(batches[0], batches[1]):  # a vanishing temperature is greedy, never NaN
        assert np.array_equal(greedy.sequence.tokens, tiny.sequence.tokens)


def test_same_seed_same_music(tiny_run: Path) -> None:
    trained = load_model(tiny_run)
    runs = [generate(trained, empty_prompt(TOKENIZER), SamplingConfig(seed=seed), new_tokens=30) for seed in (7, 7, 8)]
    assert np.array_equal(runs[0].sequence.tokens, runs[1].sequence.tokens)
    assert not np.array_equal(runs[0].sequence.tokens, runs[2].sequence.tokens)


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
    assert TOKENIZER.grammar.check(generation.sequence.tokens) is None


def midigen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midigen", *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_a_continuation_with_its_picture(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mid"
    done = midigen("generate", str(tiny_run), "--prompt", str(FUER_ELISE), "--prompt-bars", "2", "--bars", "2",
                   "--seed", "1", "--top-p", "0.9", "-o", str(out), "--png")
    assert done.returncode == 0, done.stderr
    assert symusic.Score(out).note_num() > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_a_continuation_with_its_sound(tiny_run: Path, tmp_path: Path) -> None:
    try:
        find_fluidsynth(), find_soundfont()
    except MidigenError as missing:
        pytest.skip(f"no WAV rendering here: {missing}")
    out = tmp_path / "out.mid"
    done = midigen("generate", str(tiny_run), "--prompt", str(FUER_ELISE), "--prompt-bars", "2", "--bars", "2",
                   "--seed", "1", "-o", str(out), "--wav")
    assert done.returncode == 0, done.stderr
    assert out.with_suffix(".wav").read_bytes()[:4] == b"RIFF"


def test_cli_samples_several_prompts_in_one_batch_as_each_alone(tiny_run: Path, tmp_path: Path) -> None:
    """Two prompts, two samples each, a vanishing temperature: OUT-1..4.mid; the third is the second prompt's first
    sample, seed 5 + 2, which `--seed 7` alone writes again."""
    out = tmp_path / "out.mid"
    canon = FUER_ELISE.with_name("Canon_In_D_Major_-_Johann_Pachelbel_-_Chorus.mid")
    common = ["--prompt-bars", "2", "--tokens", "40", "--temperature", "1e-45"]
    done = midigen("generate", str(tiny_run), "--prompt", str(FUER_ELISE), "--prompt", str(canon), "--num-samples", "2",
                   "--seed", "5", *common, "-o", str(out), "--png")
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"out-{n}.{suffix}" for n in range(1, 5) for suffix in ("mid", "png")]
    (third,) = [line for line in done.stdout.splitlines() if line.startswith(f"{tmp_path / 'out-3.mid'}: ")]
    assert third.endswith("seed 7")
    alone = tmp_path / "alone" / "canon.mid"
    done = midigen("generate", str(tiny_run), "--prompt", str(canon), "--seed", "7", *common, "-o", str(alone))
    assert done.returncode == 0, done.stderr
    assert TOKENIZER.sparse_score(alone).notes() == TOKENIZER.sparse_score(tmp_path / "out-3.mid").notes()
    assert TOKENIZER.sparse_score(tmp_path / "out-1.mid").notes() != TOKENIZER.sparse_score(alone).notes()


def starts_with_a_rest(tmp_path: Path) -> Path:
    """Für Elise moved two bars later: its first two bars hold one long rest."""
    score = symusic.Score(FUER_ELISE)
    (signature,) = score.time_signatures
    bar_ticks = score.ticks_per_quarter * 4 * signature.numerator // signature.denominator
    for track in score.tracks:
        track.shift_time(2 * bar_ticks, inplace=True)
    path = tmp_path / "rest.mid"
    score.dump_midi(path)
    return path


def test_a_prompt_of_only_rests_is_refused_and_one_note_is_enough(tmp_path: Path) -> None:
    rest = starts_with_a_rest(tmp_path)
    with pytest.raises(BadMidiError, match="the first 2 bar"):
        load_prompt(rest, 2, TOKENIZER)  # <sos>, <sep>, the rest's length: a duration token, not a note
    prompt = load_prompt(rest, 3, TOKENIZER)
    assert TOKENIZER.sounding()[prompt.sequence.tokens].any()
    assert (prompt.sequence.steps[2:] >= 2 * 24).all()  # after <sos>, <sep>: the rest's length, then bar 3's notes


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
        ("prompt bars that only rest", [run, "--prompt", str(starts_with_a_rest(tmp_path)), "--prompt-bars", "2",
                                        "--bars", "1", "-o", out], "hold no notes"),
        ("zero prompt bars", [run, "--prompt", str(FUER_ELISE), "--prompt-bars", "0", "--bars", "1", "-o", out],
         "--prompt-bars"),
        ("negative temperature", [run, "--temperature", "-0.5", "--bars", "1", "-o", out], "temperature"),
        ("infinite temperature", [run, "--temperature", "inf", "--bars", "1", "-o", out], "finite"),
        ("temperature not a number", [run, "--temperature", "nan", "--bars", "1", "-o", out], "finite"),
        ("top-p not a number", [run, "--top-p", "nan", "--bars", "1", "-o", out], "top-p"),
        ("no samples", [run, "--num-samples", "0", "--bars", "1", "-o", out], "--num-samples"),
        ("seconds not a number", [run, "--seconds", "nan", "-o", out], "--seconds"),
    ]


def test_cli_bad_input_is_one_line_and_exit_2(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    """In this process (a command each, not a Python each), so that any exception but the one-line error fails here."""
    for name, args, message in bad_inputs(tiny_run, tmp_path):
        code, stderr = main(["generate", *args]), capsys.readouterr().err
        assert code == 2, (name, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert message in stderr, (name, stderr)
    assert not (tmp_path / "x.mid").exists()
