"""Pictures and sound of a MIDI file: a piano roll PNG (matplotlib) and a WAV (FluidSynth + a GM SoundFont)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import symusic
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from midigen.codec import pitch_name
from midigen.codec.midi_io import load_score
from midigen.errors import BadMidiError, MidigenError
from midigen.evaluation.piece import Piece, load_piece
from midigen.io_utils import atomic_write_with

MIN_WIDTH_PX = 800
MAX_WIDTH_PX = 2400
WIDTH_PX_PER_BAR = 60
HEIGHT_PX = 600
DPI = 100
MIN_NOTE_WIDTH_PX = 1.5
BAR_LABELS_PER_PX = 1 / 50
MIN_PITCH_SPAN = 12
PROMPT_ALPHA = 0.45
BLACK_KEYS = (1, 3, 6, 8, 10)

SAMPLE_RATE = 44100
PEAK_DBFS = -1.0
SOUNDFONT_ENV = "MIDIGEN_SOUNDFONT"
SOUNDFONT_PLACES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/*.sf2",
    "/usr/share/soundfonts/*.sf2",
)
INSTALL_HINT = "Debian/Ubuntu: apt-get install fluidsynth fluid-soundfont-gm; macOS: brew install fluid-synth"


def piano_roll_width_px(num_bars: int) -> int:
    """Wide enough to read a short phrase, capped so that a long piece stays one glance wide."""
    return int(np.clip(WIDTH_PX_PER_BAR * num_bars, MIN_WIDTH_PX, MAX_WIDTH_PX))


def render_piano_roll(
    source: str | Path | bytes | symusic.Score,
    png_path: str | Path,
    title: str | None = None,
    width_px: int | None = None,
    height_px: int = HEIGHT_PX,
) -> Path:
    """Draw the piece's non-drum notes as a piano roll PNG of `width_px` × `height_px` pixels.

    x: time, with a line at each bar and bar numbers; y: pitch, labelled with note names; colour: velocity for
    one part, else the part: the instrument (General MIDI program), or the track where all play one instrument.
    In files written by `midigen generate` the prompt is shaded and faded and a line marks where the continuation
    starts. The width defaults to `piano_roll_width_px(bars)`.
    """
    piece = load_piece(source)
    width_px = width_px or piano_roll_width_px(piece.num_bars)
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    draw_keyboard_rows(axes, piece)
    draw_notes(figure, axes, piece, width_px)
    draw_bars(axes, piece, width_px)
    if piece.continuation_tick is not None:
        draw_continuation(axes, piece, piece.continuation_tick)
    drums = f", {piece.drum_notes} drum notes not shown" if piece.drum_notes else ""
    axes.set_title(f"{title or Path(piece.name).name} ({piece.num_bars} bars{drums})", fontsize=10)
    return save_figure(figure, png_path)


def save_figure(figure: Figure, png_path: str | Path) -> Path:
    try:
        atomic_write_with(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    except OSError as exc:
        raise MidigenError(f"{png_path}: cannot write: {exc.strerror or exc}") from None
    return Path(png_path)


def quarters(ticks: np.ndarray | int, piece: Piece) -> np.ndarray:
    return np.asarray(ticks, dtype=np.float64) / piece.ticks_per_quarter


def pitch_limits(piece: Piece) -> tuple[int, int]:
    """Lowest and highest pitch row shown: the notes' range, at least an octave, one row of margin."""
    low, high = int(piece.pitches.min()), int(piece.pitches.max())
    missing = max(0, MIN_PITCH_SPAN - (high - low))
    return max(0, low - 1 - missing // 2), min(127, high + 1 + (missing - missing // 2))


def draw_keyboard_rows(axes: Axes, piece: Piece) -> None:
    low, high = pitch_limits(piece)
    for pitch in range(low, high + 1):
        if pitch % 12 in BLACK_KEYS:
            axes.axhspan(pitch - 0.5, pitch + 0.5, color="0.93", linewidth=0, zorder=0)
    span = high - low
    labelled = [p for p in range(low, high + 1) if span <= 2 * MIN_PITCH_SPAN or p % 12 == 0]
    axes.set_yticks(labelled, [pitch_name(p) for p in labelled], fontsize=8)
    axes.set_ylim(low - 0.5, high + 0.5)
    axes.set_ylabel("pitch")


def draw_notes(figure: Figure, axes: Axes, piece: Piece, width_px: int) -> None:
    total_quarters = float(quarters(piece.bar_starts[-1], piece))
    min_width = MIN_NOTE_WIDTH_PX * total_quarters / width_px  # so that short notes in long pieces stay visible
    starts = quarters(piece.onsets, piece)
    widths = np.maximum(quarters(piece.durations, piece), min_width)
    x0, x1 = starts, starts + widths
    y0, y1 = piece.pitches - 0.4, piece.pitches + 0.4
    corners = np.stack([np.stack(c, axis=1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], axis=1)  # (N, 4, 2)
    colours = note_colours(figure, axes, piece)
    if piece.continuation_tick is not None:
        colours[piece.onsets < piece.continuation_tick, 3] = PROMPT_ALPHA
    edge = 0.3 if width_px / piece.num_bars >= WIDTH_PX_PER_BAR else 0.0
    axes.add_collection(PolyCollection(corners, facecolors=colours, edgecolors="0.2", linewidths=edge, zorder=2))


def note_colours(figure: Figure, axes: Axes, piece: Piece) -> np.ndarray:
    """(N, 4) RGBA: by velocity (with a colour bar) for one part, by part (with a legend) for several."""
    if len(piece.part_names) == 1:
        cmap, norm = colormaps["viridis"], Normalize(0, 127)
        colourbar = figure.colorbar(ScalarMappable(norm, cmap), ax=axes, pad=0.005, fraction=0.02)
        colourbar.set_label("velocity", fontsize=8)
        return cmap(norm(piece.velocities))
    palette = colormaps["tab10"]
    handles = [Patch(color=palette(i % 10), label=name) for i, name in enumerate(piece.part_names)]
    axes.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    return palette(piece.parts % 10)


def draw_bars(axes: Axes, piece: Piece, width_px: int) -> None:
    """Bar numbers (from 1) every 1, 2, 4, 8... bars so that they never crowd, a line at each numbered bar,
    fainter lines at the other bars, and at the beats of short pieces."""
    bar_x = quarters(piece.bar_starts, piece)
    most_labels = max(1, int(width_px * BAR_LABELS_PER_PX))
    every = 2 ** math.ceil(math.log2(max(1, piece.num_bars / most_labels)))
    labelled = np.arange(0, piece.num_bars, every)
    lines = [(bar_x, "0.8", 0.4), (bar_x[labelled], "0.5", 0.7)]
    if piece.num_bars <= 16:
        lines.insert(0, (quarters(piece.beat_starts(), piece), "0.9", 0.4))
    for x, colour, width in lines:
        axes.vlines(x, 0, 1, transform=axes.get_xaxis_transform(), colors=colour, linewidths=width, zorder=1)
    axes.set_xticks(bar_x[labelled], [str(bar + 1) for bar in labelled], fontsize=8)
    axes.set_xlim(bar_x[0], bar_x[-1])
    axes.set_xlabel("bar")


def draw_continuation(axes: Axes, piece: Piece, continuation_tick: int) -> None:
    x = float(quarters(continuation_tick, piece))
    axes.axvspan(float(quarters(piece.bar_starts[0], piece)), x, color="#c9d6ea", alpha=0.5, linewidth=0, zorder=0)
    axes.axvline(x, color="#b22222", linewidth=1.5, zorder=3)
    label_box = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
    for text, align in (("prompt ", "right"), (" continuation", "left")):
        axes.text(x, 0.98, text, transform=axes.get_xaxis_transform(), ha=align, va="top", fontsize=8,
                  color="#b22222", bbox=label_box, zorder=4)


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    """The SoundFont to render with: the one given, else $MIDIGEN_SOUNDFONT, else the first found in
    the usual places (Debian's FluidR3_GM, any .sf2 in /usr/share/sounds/sf2 or /usr/share/soundfonts,
    pretty_midi's TimGM6mb.sf2 when pretty_midi is installed)."""
    if soundfont is not None:
        return checked_soundfont(Path(soundfont))
    if os.environ.get(SOUNDFONT_ENV):
        return checked_soundfont(Path(os.environ[SOUNDFONT_ENV]))
    for candidate in soundfont_candidates():
        if candidate.is_file():
            return checked_soundfont(candidate)
    raise MidigenError(
        f"no General MIDI SoundFont found: install one ({INSTALL_HINT}), or pass --soundfont FILE.sf2 "
        f"or set {SOUNDFONT_ENV}"
    )


def soundfont_candidates() -> list[Path]:
    found: list[Path] = []
    for place in SOUNDFONT_PLACES:
        pattern = Path(place)
        found.extend(sorted(pattern.parent.glob(pattern.name)))
    spec = importlib.util.find_spec("pretty_midi")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        found.append(Path(spec.origin).parent / "TimGM6mb.sf2")
    return found


def checked_soundfont(path: Path) -> Path:
    try:
        with path.open("rb") as file:
            header = file.read(12)
    except OSError as exc:
        raise MidigenError(f"{path}: cannot read SoundFont: {exc.strerror or exc}") from None
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise MidigenError(f"{path}: not a SoundFont (no RIFF sfbk header)")
    return path


def find_fluidsynth() -> str:
    found = shutil.which("fluidsynth")
    if found is None:
        raise MidigenError(f"fluidsynth not found: install it to render WAV ({INSTALL_HINT})")
    return found


def render_wav(
    midi_path: str | Path,
    wav_path: str | Path,
    soundfont: str | Path | None = None,
    sample_rate: int = SAMPLE_RATE,
    timeout_s: float | None = None,
) -> Path:
    """Render a MIDI file to a 16-bit stereo WAV with FluidSynth, deterministically, peak-normalised.

    The WAV lasts as long as the music plus the release of the last notes. FluidSynth renders
    faster than real time; it is stopped after `timeout_s` (default: a minute plus the music's length).
    """
    fluidsynth = find_fluidsynth()
    sf2 = find_soundfont(soundfont)
    score = load_score(midi_path)
    if score.note_num() == 0:
        raise BadMidiError(midi_path, "no notes")
    timeout_s = timeout_s or 60.0 + float(score.to("second").end())
    try:
        with tempfile.TemporaryDirectory(prefix="midigen-render-") as scratch:
            raw = Path(scratch) / "audio.f32"
            run_fluidsynth(fluidsynth, sf2, Path(midi_path), raw, sample_rate, timeout_s)
            samples = np.fromfile(raw, dtype="<f4").reshape(-1, 2)  # (frames, 2)
            atomic_write_with(wav_path, lambda tmp: write_wav(tmp, normalised(samples), sample_rate))
    except OSError as exc:
        raise MidigenError(f"{wav_path}: cannot write: {exc.strerror or exc}") from None
    return Path(wav_path)


def run_fluidsynth(
    fluidsynth: str, sf2: Path, midi_path: Path, raw_path: Path, sample_rate: int, timeout_s: float
) -> None:
    """Render to raw little-endian float32 stereo, which keeps loud passages from clipping before normalising."""
    command = [
        fluidsynth,
        "-n", "-i", "-q",  # no MIDI input, no shell, no banner
        "-f", os.devnull,  # no user or system config file, which could change the sound
        "-o", "player.timing-source=sample",  # time from samples rendered, never the wall clock
        "-T", "raw", "-O", "float", "-E", "little",
        "-r", str(sample_rate),
        "-F", str(raw_path),
        str(sf2.resolve()), str(midi_path.resolve()),  # absolute, so that no name reads as an option
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise MidigenError(f"{midi_path}: fluidsynth did not finish within {timeout_s:.0f} s") from None
    if result.returncode != 0 or not raw_path.is_file() or raw_path.stat().st_size == 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}, no audio"
        raise MidigenError(f"{midi_path}: fluidsynth failed: {reason}")


def normalised(samples: np.ndarray) -> np.ndarray:
    """int16 samples whose loudest peak is at PEAK_DBFS (silence stays silence)."""
    peak = float(np.abs(samples).max(initial=0.0))
    scale = 10 ** (PEAK_DBFS / 20) * 32767 / peak if peak > 0 else 0.0
    return np.round(samples * scale).astype("<i2")


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(samples.tobytes())
