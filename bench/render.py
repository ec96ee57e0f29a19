"""Rendering speed: `midigen render` (WAV through FluidSynth, and the piano-roll PNG) on real pieces.

The pieces are movements of the Beethoven string quartets bundled with music21 (exported once into
.bench/ by `midigen corpus`): the one whose length is closest to three minutes, and the longest.
Each is rendered three times and the median wall time is compared with the music's own length.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import symusic
from common import corpus_files, median_seconds, write_section

from midigen.evaluation.render import find_soundfont, render_piano_roll, render_wav

TARGET_SECONDS = 180.0


def music_seconds(path: Path) -> float:
    return float(symusic.Score(str(path)).to("second").end())


def main() -> None:
    lengths = {path: music_seconds(path) for path in corpus_files("beethoven-quartets")}
    closest = min(lengths, key=lambda p: abs(lengths[p] - TARGET_SECONDS))
    longest = max(lengths, key=lengths.__getitem__)
    rows = []
    with tempfile.TemporaryDirectory(prefix="midigen-bench-render-") as scratch:
        out = Path(scratch)
        for path in dict.fromkeys((closest, longest)):
            seconds = lengths[path]
            wav = median_seconds(lambda: render_wav(path, out / "piece.wav"), repeats=3)
            png = median_seconds(lambda: render_piano_roll(path, out / "piece.png"), repeats=3)
            rows.append(f"| {path.stem} | {int(seconds // 60)}:{seconds % 60:04.1f} | {wav:.2f} s | "
                        f"{seconds / wav:.0f}× | {png:.2f} s |")
    write_section(
        "Rendering: WAV and piano roll",
        f"Median of 3 renders on CPU; SoundFont `{find_soundfont().name}`, 44.1 kHz stereo. Goal: a 3-minute "
        "piece renders in well under real time.\n\n"
        "| piece | length | WAV | faster than real time | piano roll PNG |\n|---|---|---|---|---|\n" + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
