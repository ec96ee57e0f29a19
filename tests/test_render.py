"""Piano roll PNGs and FluidSynth WAVs: sizes, content, determinism, real files, and bad input."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import symusic
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.image import imread

from midigen.cli.main import main
from midigen.codec.midi_io import CONTINUATION_MARKER
from midigen.errors import MidigenError
from midigen.evaluation import render
from midigen.evaluation.piece import load_piece
from midigen.evaluation.render import draw_bars, draw_keyboard_rows, find_soundfont, render_piano_roll, render_wav

TPQ = 480
MARKER_RED = np.array([0xB2, 0x22, 0x22]) / 255
needs_fluidsynth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None, reason="fluidsynth is not installed (`make setup` installs it)"
)


def scale_score(bars: int = 2, bpm: float = 120.0, time_signature: tuple[int, int] = (4, 4)) -> symusic.Score:
    """Quarter notes up and down the C major scale for `bars` bars."""
    score = symusic.Score(TPQ)
    track = symusic.Track("piano", 0, False)
    scale = [60, 62, 64, 65, 67, 69, 71, 72, 71, 69, 67, 65, 64, 62]
    quarters_per_bar = time_signature[0] * 4 // time_signature[1]
    for i in range(bars * quarters_per_bar):
        track.notes.append(symusic.Note(i * TPQ, TPQ, scale[i % len(scale)], 40 + i % 80))
    score.tracks.append(track)
    score.time_signatures.append(symusic.TimeSignature(0, *time_signature))
    score.tempos.append(symusic.Tempo(0, bpm))
    return score


def saturated_share(png: Path) -> float:
    """Share of strongly coloured pixels: notes (axes, grid, text and shading are grey or pale)."""
    rgb = imread(png)[..., :3]
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.25).mean())


def marker_pixels(png: Path) -> int:
    rgb = imread(png)[..., :3]
    return int((np.abs(rgb - MARKER_RED).max(axis=2) < 0.05).sum())


def test_two_bar_phrase_png(tmp_path: Path) -> None:
    png = render_piano_roll(scale_score(bars=2), tmp_path / "phrase.png")
    assert imread(png).shape[:2] == (600, 800)
    assert saturated_share(png) > 0.01
    assert marker_pixels(png) == 0


def test_two_hundred_bar_piece_png(tmp_path: Path) -> None:
    png = render_piano_roll(scale_score(bars=200), tmp_path / "long.png")
    assert imread(png).shape[:2] == (600, 2400)
    assert saturated_share(png) > 0.05


def test_bar_numbers_follow_the_time_signature_and_thin_out() -> None:
    axes = Figure().add_subplot()
    draw_bars(axes, load_piece(scale_score(bars=4, time_signature=(3, 4))), 800)
    assert list(axes.get_xticks()) == [0, 3, 6, 9]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["1", "2", "3", "4"]
    axes = Figure().add_subplot()
    draw_bars(axes, load_piece(scale_score(bars=200)), 2400)  # at most 48 labels: every 8th bar
    assert [label.get_text() for label in axes.get_xticklabels()][:3] == ["1", "9", "17"]
    assert axes.get_xlim() == (0, 800)


def test_pitch_axis_has_note_names() -> None:
    axes = Figure().add_subplot()
    draw_keyboard_rows(axes, load_piece(scale_score()))
    names = [label.get_text() for label in axes.get_yticklabels()]
    assert names[0] == "B3" and "C4" in names and "F#4" in names and names[-1] == "C#5"


def test_prompt_and_continuation_are_marked(tmp_path: Path) -> None:
    score = scale_score(bars=4)
    score.markers.append(symusic.TextMeta(8 * TPQ, CONTINUATION_MARKER))
    png = render_piano_roll(score, tmp_path / "generated.png")
    assert marker_pixels(png) > 400  # the line through the whole plot, about 500 px tall


def test_notes_and_the_continuation_line_are_drawn_where_they_belong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three bars of 4/4, one track, velocity 100: a prompt note C4 on beats 1-2 of bar 1, the continuation marker at
    bar 3, then C5 on beats 3-4 of bar 3. The plot spans the three bars (0-12 quarters) and B3..C#5 (the notes'
    range, a row of margin each side). Read back from the PNG, each note fills its own pitch row from its onset to
    its end in its velocity's colour, the prompt's faded over the prompt's shading, and the line stands at quarter 8."""
    score = symusic.Score(TPQ)
    track = symusic.Track("piano", 0, False)
    track.notes.extend([symusic.Note(0, 2 * TPQ, 60, 100), symusic.Note(10 * TPQ, 2 * TPQ, 72, 100)])
    score.tracks.append(track)
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    score.markers.append(symusic.TextMeta(8 * TPQ, CONTINUATION_MARKER))
    figures: list[Figure] = []
    save_figure = render.save_figure
    monkeypatch.setattr(render, "save_figure", lambda figure, path: (figures.append(figure), save_figure(figure, path))[1])
    rgb = imread(render_piano_roll(score, tmp_path / "roll.png"))[..., :3]
    plot = figures[0].axes[0].get_window_extent()  # where the layout put the plot, in pixels from the bottom left

    def pixel(quarter: float, pitch: float) -> np.ndarray:
        x = plot.x0 + quarter / 12 * plot.width
        y = plot.y0 + (pitch - 58.5) / 15 * plot.height  # rows 59..73, each one pitch high
        return rgb[int(rgb.shape[0] - y), int(x)]

    note = np.array(colormaps["viridis"](100 / 127)[:3])
    shading = pixel(5.5, 60)  # the prompt's background on C4's row, between beat lines
    faded = render.PROMPT_ALPHA * note + (1 - render.PROMPT_ALPHA) * shading
    for colour, pitch, inside, outside in ((faded, 60, (0.5, 1.5, 1.75), (2.25, 5.5)), (note, 72, (10.25, 10.5, 11.75), (9.75, 8.5))):
        for quarter in inside:
            np.testing.assert_allclose(pixel(quarter, pitch), colour, atol=0.02, err_msg=f"{pitch} at {quarter}")
        for quarter, row in [(q, pitch) for q in outside] + [(inside[1], pitch - 1), (inside[1], pitch + 1)]:
            assert np.abs(pixel(quarter, row) - colour).max() > 0.1, f"{row} at {quarter}"
    assert np.abs(shading - 1).max() > 0.05  # the prompt is shaded
    red = np.abs(rgb - MARKER_RED).max(axis=2) < 0.05
    red[: int(rgb.shape[0] - plot.y0 - plot.height / 2)] = False  # below the "prompt" and "continuation" labels
    rows, columns = np.nonzero(red)
    assert abs(columns.mean() - (plot.x0 + 8 / 12 * plot.width)) < 1.5 and np.ptp(columns) <= 2
    assert len(np.unique(rows)) > 0.45 * plot.height  # the whole lower half of the plot


def test_real_prompt_png(tmp_path: Path, prompt_files: list[Path]) -> None:
    png = render_piano_roll(prompt_files[0], tmp_path / "prompt.png")
    assert imread(png).shape[:2] == (600, 800)
    assert saturated_share(png) > 0.01


def wav_samples(path: Path) -> tuple[float, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (2, 2)
        frames = wav.readframes(wav.getnframes())
        return wav.getnframes() / wav.getframerate(), np.frombuffer(frames, dtype="<i2")


@needs_fluidsynth
def test_wav_lasts_as_long_as_the_music_and_is_deterministic(tmp_path: Path) -> None:
    midi = tmp_path / "scale.mid"
    scale_score(bars=2, bpm=120).dump_midi(str(midi))  # 8 quarters at 120 bpm: 4 s
    seconds, samples = wav_samples(render_wav(midi, tmp_path / "a.wav"))
    assert 4.0 <= seconds <= 4.0 + 5.0  # plus the release of the last note
    assert np.abs(samples).max() == round(10 ** (render.PEAK_DBFS / 20) * 32767)
    music = samples[: 4 * 44100 * 2].astype(np.float64)
    assert np.sqrt(np.mean(music**2)) > 1000
    _, again = wav_samples(render_wav(midi, tmp_path / "b.wav"))
    assert np.array_equal(samples, again)


@needs_fluidsynth
def test_real_prompt_wav(tmp_path: Path, prompt_files: list[Path]) -> None:
    music_seconds = symusic.Score.from_file(str(prompt_files[0])).to("second").end()
    seconds, samples = wav_samples(render_wav(prompt_files[0], tmp_path / "prompt.wav"))
    assert music_seconds <= seconds <= music_seconds + 5.0
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 1000


@needs_fluidsynth
def test_cli_writes_png_and_wav(tmp_path: Path, prompt_files: list[Path]) -> None:
    png, wav = tmp_path / "out.png", tmp_path / "out.wav"
    assert main(["render", str(prompt_files[1]), "--png", str(png), "--wav", str(wav)]) == 0
    assert imread(png).shape[:2] == (600, 800)
    assert wav_samples(wav)[0] > 1.0
    beside = tmp_path / "song.mid"
    beside.write_bytes(prompt_files[1].read_bytes())
    assert main(["render", str(beside)]) == 0  # neither option: both, beside the input
    assert imread(tmp_path / "song.png").shape[:2] == (600, 800)
    assert wav.read_bytes() == (tmp_path / "song.wav").read_bytes()  # the same samples, whatever the file name


def bad_midi_files(tmp_path: Path) -> list[Path]:
    text, empty, silent = tmp_path / "text.mid", tmp_path / "empty.mid", tmp_path / "silent.mid"
    text.write_text("MThe quick brown fox")
    empty.write_bytes(b"")
    silent_score = symusic.Score(TPQ)
    silent_score.tracks.append(symusic.Track("piano", 0, False))
    silent_score.dump_midi(str(silent))
    return [text, empty, silent]


@pytest.mark.parametrize("kind", ["--png", "--wav"])
def test_cli_bad_midi_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    if kind == "--wav" and shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (`make setup` installs it)")
    for bad, reason in zip(bad_midi_files(tmp_path), ["not a MIDI file", "empty file", "no notes"]):
        out = tmp_path / f"out{kind.replace('--', '.')}"
        assert main(["render", str(bad), kind, str(out)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(f"midigen render: error: {bad}: {reason}")
        assert not out.exists()


@needs_fluidsynth
def test_cli_missing_soundfont(tmp_path: Path, capsys: pytest.CaptureFixture[str], prompt_files: list[Path]) -> None:
    fake = tmp_path / "fake.sf2"
    fake.write_text("not a soundfont")
    for soundfont, reason in ((tmp_path / "none.sf2", "cannot read SoundFont"), (fake, "not a SoundFont")):
        wav = tmp_path / "out.wav"
        assert main(["render", str(prompt_files[0]), "--wav", str(wav), "--soundfont", str(soundfont)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(f"midigen render: error: {soundfont}: {reason}")
        assert not wav.exists()


def test_no_soundfont_anywhere_says_how_to_install_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(render.SOUNDFONT_ENV, raising=False)
    monkeypatch.setattr(render, "soundfont_candidates", lambda: [])
    with pytest.raises(MidigenError, match="apt-get install fluidsynth fluid-soundfont-gm") as error:
        find_soundfont()
    assert "\n" not in str(error.value)


def test_soundfont_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    soundfont = tmp_path / "mine.sf2"
    soundfont.write_bytes(b"RIFF\x04\x00\x00\x00sfbk")
    monkeypatch.setenv(render.SOUNDFONT_ENV, str(soundfont))
    assert find_soundfont() == soundfont


def test_missing_fluidsynth_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    midi = tmp_path / "scale.mid"
    scale_score().dump_midi(str(midi))
    with pytest.raises(MidigenError, match="fluidsynth not found: install it"):
        render_wav(midi, tmp_path / "out.wav")
