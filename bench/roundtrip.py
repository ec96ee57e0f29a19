"""What the encoding keeps: MIDI → tokens → MIDI on real files, note by note, by corpus.

Each file's notes on the grid (onset and end rounded to the nearest step, at least one step and at most
`max_duration` steps long), quantised here independently of the codec, are compared with the notes of the MIDI file
that `encode` → `decode` writes, read back the same way. Single stream, a note is (onset step, pitch, duration) and
drums are dropped; with instruments, a note also has its instrument (General MIDI program, or drums) and a drum
hit's duration is not compared. A note comes back if the written file has one with the same key. Notes that do not
come back are split into those the documented merge drops (a longer note of the same instrument has the same pitch
and onset step: voices in unison, doubled tracks; for drums, any hit of the same pitch and step) and any other loss.
Goals, on the notes left after the documented merge: at least 99% back single stream (issue #2), at least 99.5%
with instruments.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from common import ROOT, corpus_files, write_section

from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.midi_io import DRUM_INSTRUMENT, read_notes

CORPORA = ("bach-chorales", "palestrina", "beethoven-quartets")
DATA = ROOT / "tests" / "data"
SHARED_PIANO = ROOT.parent / "shared" / "midi" / "piano"
SINGLE = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)
TOKENIZERS = {
    "single stream": (SINGLE, 0.99),
    "single stream, `--keep-unisons`": (TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0,
                                                        merge_unisons=False), 0.99),
    "instruments (default)": (TokenizerConfig(), 0.995),
    "instruments, `--keep-unisons`": (TokenizerConfig(merge_unisons=False), 0.995),
}

Note = tuple[int, int, int, int]  # (onset step, pitch, duration in steps or 0 for a drum hit, instrument)


def grid_notes(source: str | Path | bytes, config: TokenizerConfig) -> list[Note]:
    """Every note of a MIDI file or MIDI bytes on the grid (duplicates kept), by integer arithmetic per note."""
    notes = read_notes(source)
    spq, tpq = config.steps_per_quarter, notes.ticks_per_quarter
    keep = np.ones(len(notes), dtype=bool) if config.keep_drums else ~notes.drums
    result = []
    for onset, length, pitch, program, drum in zip(notes.onsets[keep].tolist(), notes.durations[keep].tolist(),
                                                   notes.pitches[keep].tolist(), notes.programs[keep].tolist(),
                                                   notes.drums[keep].tolist()):
        step = (2 * spq * onset + tpq) // (2 * tpq)
        end = (2 * spq * (onset + length) + tpq) // (2 * tpq)
        duration = min(max(end - step, 1), config.max_duration)
        if not config.instruments:
            result.append((step, pitch, duration, 0))
        else:
            result.append((step, pitch, 0 if drum else duration, DRUM_INSTRUMENT if drum else program))
    return result


def compare(path: Path, config: TokenizerConfig) -> Counter[str]:
    """Counts of this file's notes: all, back identical, dropped by the merge, lost otherwise."""
    tokenizer = load_tokenizer(config)
    expected = grid_notes(path, config)
    if not expected:  # a drum track alone, drums dropped: nothing to encode
        return Counter()
    written = tokenizer.decode(tokenizer.encode(path)).dumps_midi()
    back = set(grid_notes(written, config))
    longest: dict[tuple[int, int, int], int] = {}
    for step, pitch, duration, instrument in expected:
        longest[step, pitch, instrument] = max(duration, longest.get((step, pitch, instrument), 0))
    counts: Counter[str] = Counter(notes=len(expected))
    for step, pitch, duration, instrument in expected:
        if (step, pitch, duration, instrument) in back:
            counts["back"] += 1
        elif config.merge_unisons and (step, pitch, longest[step, pitch, instrument], instrument) in back:
            counts["merged"] += 1
        else:
            counts["other"] += 1
    return counts


def main() -> None:
    sets = {name: corpus_files(name) for name in CORPORA}
    sets["prompts (tests/data/prompts)"] = sorted((DATA / "prompts").glob("*.mid"))
    sets["band, orchestra, drums (tests/data/multitrack)"] = sorted((DATA / "multitrack").glob("*.mid"))
    if SHARED_PIANO.is_dir():
        sets["expressive piano (../shared/midi/piano)"] = sorted(SHARED_PIANO.glob("*.mid"))
    rows = []
    for name, paths in sets.items():
        for label, (config, goal) in TOKENIZERS.items():
            total: Counter[str] = Counter()
            for path in paths:
                total += compare(path, config)
            share = total["back"] / total["notes"]
            kept = 1 - total["other"] / total["notes"]  # of the notes left after the documented merge, all back
            rows.append(
                f"| {name} | {label} | {len(paths)} | {total['notes']:,} | {100 * share:.2f}% "
                f"| {100 * total['merged'] / total['notes']:.2f}% | {total['other']} "
                f"| {100 * kept:.2f}% (goal ≥ {100 * goal:g}%: {'met' if kept >= goal else 'NOT met'}) |"
            )
    write_section(
        "Round trip: what the encoding keeps",
        "MIDI → tokens → MIDI (8 steps per quarter, durations up to 256 steps): single stream (drums dropped, a "
        "note is its onset step, pitch and duration) and with instruments (drums kept, each note also keeps its "
        "instrument; a drum hit's length is not compared), each with unisons merged (the default: notes of one pitch "
        "starting on one step of one instrument become the longest) and kept apart. Every note of every track "
        "counted; a note is back if the written file has one with the same key.\n\n"
        "The goals count the notes left after the documented merge (as the project decided): a note is lost only "
        "if some other loss takes it.\n\n"
        "| files | encoding | count | notes | back identical | dropped by the merge of unisons "
        "| other losses | back, after the merge |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
