"""What the encoding keeps: MIDI → tokens → MIDI on real files, note by note.

Each file's notes on the grid (onset and end rounded to the nearest step, at least one step and at
most `max_duration` steps long, drums dropped) are compared with the notes of the MIDI file that
`encode` → `decode` writes, read back the same way. A note comes back if a note with the same
(onset step, pitch, duration) does. Notes that do not come back are split into those the documented
merge drops (a longer note has the same pitch and onset step: voices in unison, doubled tracks) and
any other loss. Goal (issue #2): at least 99% of notes back identical. Measured with the default
tokenizer, which merges unisons as the seed did, and with unisons kept (`--keep-unisons`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from common import ROOT, corpus_files, write_section

from midigen.codec import SeedTokenizer, TokenizerConfig
from midigen.codec.midi_io import read_notes

CORPORA = ("bach-chorales", "palestrina", "beethoven-quartets")
PROMPTS = ROOT / "tests" / "data" / "prompts"
GOAL = 0.99
TOKENIZERS = {"default (unisons merged)": TokenizerConfig(), "`--keep-unisons`": TokenizerConfig(merge_unisons=False)}

Note = tuple[int, int, int]  # (onset step, pitch, duration in steps)


def grid_notes(source: str | Path | bytes, tokenizer: SeedTokenizer) -> list[Note]:
    """Every note of a MIDI file or MIDI bytes on the grid, as the encoding quantises it (duplicates kept)."""
    notes = read_notes(source, tokenizer.config.keep_drums)
    onsets, durations, _ = tokenizer.quantise(notes)
    return list(zip(onsets.tolist(), notes.pitches.tolist(), durations.tolist()))


def compare(path: Path, tokenizer: SeedTokenizer) -> Counter[str]:
    """Counts of this file's notes: all, back identical, dropped by the merge, lost otherwise."""
    expected = grid_notes(path, tokenizer)
    written = tokenizer.decode(tokenizer.encode(path)).dumps_midi()
    back = set(grid_notes(written, tokenizer))
    longest: dict[tuple[int, int], int] = {}
    for step, pitch, duration in expected:
        longest[step, pitch] = max(duration, longest.get((step, pitch), 0))
    counts: Counter[str] = Counter(notes=len(expected))
    for step, pitch, duration in expected:
        if (step, pitch, duration) in back:
            counts["back"] += 1
        elif longest[step, pitch] > duration and (step, pitch, longest[step, pitch]) in back:
            counts["merged"] += 1
        else:
            counts["other"] += 1
    return counts


def main() -> None:
    sets = {name: corpus_files(name) for name in CORPORA}
    sets["prompts (tests/data/prompts)"] = sorted(PROMPTS.glob("*.mid"))
    rows = []
    for name, paths in sets.items():
        for label, config in TOKENIZERS.items():
            tokenizer = SeedTokenizer(config)
            total: Counter[str] = Counter()
            for path in paths:
                total += compare(path, tokenizer)
            share = total["back"] / total["notes"]
            rows.append(
                f"| {name} | {label} | {len(paths)} | {total['notes']:,} | {100 * share:.2f}% "
                f"({'met' if share >= GOAL else 'NOT met'}) | {100 * total['merged'] / total['notes']:.2f}% "
                f"| {total['other']} |"
            )
    write_section(
        "Round trip: what the encoding keeps",
        f"MIDI → tokens → MIDI (8 steps per quarter, durations up to 256 steps, drums dropped), with the default "
        f"`TokenizerConfig`, which merges notes of one pitch starting on the same step into the longest, and with "
        f"unisons kept apart. Notes on the grid, each note of each track counted; a note is back if the written file "
        f"has a note with the same (onset step, pitch, duration). Goal: at least {100 * GOAL:.0f}% back.\n\n"
        "| files | tokenizer | count | notes | back identical | dropped by the same-pitch, same-onset merge "
        "| other losses |\n|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
