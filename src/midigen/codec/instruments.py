"""General MIDI instruments as data: the 128 program names, the 16 families, and the parser of a CLI flag
that names instruments ("0,33,drums", "piano,bass,drums,violin")."""

from __future__ import annotations

from midigen.codec.midi_io import DRUM_INSTRUMENT
from midigen.errors import MidigenError

GM_NAMES: tuple[str, ...] = (
    # Piano
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet",
    # Chromatic Percussion
    "Celesta", "Glockenspiel", "Music Box", "Vibraphone", "Marimba", "Xylophone", "Tubular Bells", "Dulcimer",
    # Organ
    "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ", "Reed Organ", "Accordion", "Harmonica",
    "Tango Accordion",
    # Guitar
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)", "Electric Guitar (clean)",
    "Electric Guitar (muted)", "Overdriven Guitar", "Distortion Guitar", "Guitar Harmonics",
    # Bass
    "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass", "Slap Bass 1",
    "Slap Bass 2", "Synth Bass 1", "Synth Bass 2",
    # Strings
    "Violin", "Viola", "Cello", "Contrabass", "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani",
    # Ensemble
    "String Ensemble 1", "String Ensemble 2", "Synth Strings 1", "Synth Strings 2", "Choir Aahs", "Voice Oohs",
    "Synth Voice", "Orchestra Hit",
    # Brass
    "Trumpet", "Trombone", "Tuba", "Muted Trumpet", "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",
    # Reed
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax", "Oboe", "English Horn", "Bassoon", "Clarinet",
    # Pipe
    "Piccolo", "Flute", "Recorder", "Pan Flute", "Blown Bottle", "Shakuhachi", "Whistle", "Ocarina",
    # Synth Lead
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)", "Lead 5 (charang)",
    "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)",
    # Synth Pad
    "Pad 1 (new age)", "Pad 2 (warm)", "Pad 3 (polysynth)", "Pad 4 (choir)", "Pad 5 (bowed)", "Pad 6 (metallic)",
    "Pad 7 (halo)", "Pad 8 (sweep)",
    # Synth Effects
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)", "FX 5 (brightness)",
    "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)",
    # Ethnic
    "Sitar", "Banjo", "Shamisen", "Koto", "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    # Percussive
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock", "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    # Sound Effects
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet", "Telephone Ring", "Helicopter", "Applause",
    "Gunshot",
)
assert len(GM_NAMES) == 128

GM_FAMILIES: tuple[str, ...] = (
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Ensemble", "Brass", "Reed", "Pipe",
    "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic", "Percussive", "Sound Effects",
)
assert len(GM_FAMILIES) == 16

DRUMS_NAME = "Drums"

# Common names, each mapped to one program (lower case, spaces/underscores/hyphens treated alike).
COMMON_NAMES: dict[str, int] = {
    "piano": 0, "grand piano": 0, "acoustic piano": 0, "bright piano": 1, "electric piano": 4,
    "rhodes": 4, "harpsichord": 6, "clavinet": 7, "celesta": 8, "glockenspiel": 9, "music box": 10,
    "vibraphone": 11, "marimba": 12, "xylophone": 13, "bells": 14, "tubular bells": 14, "dulcimer": 15,
    "organ": 19, "drawbar organ": 16, "rock organ": 18, "church organ": 19, "accordion": 21, "harmonica": 22,
    "guitar": 24, "acoustic guitar": 24, "nylon guitar": 24, "steel guitar": 25, "electric guitar": 27,
    "jazz guitar": 26, "clean guitar": 27, "muted guitar": 28, "overdriven guitar": 29,
    "distortion guitar": 30,
    "bass": 33, "acoustic bass": 32, "upright bass": 32, "electric bass": 33, "fretless bass": 35,
    "slap bass": 36, "synth bass": 38,
    "violin": 40, "viola": 41, "cello": 42, "contrabass": 43, "double bass": 43, "tremolo strings": 44,
    "pizzicato": 45, "pizzicato strings": 45, "harp": 46, "timpani": 47,
    "strings": 48, "string ensemble": 48, "synth strings": 50, "choir": 52, "voice": 53, "orchestra hit": 55,
    "trumpet": 56, "trombone": 57, "tuba": 58, "muted trumpet": 59, "horn": 60, "french horn": 60,
    "brass": 61, "brass section": 61, "synth brass": 62,
    "saxophone": 65, "sax": 65, "soprano sax": 64, "alto sax": 65, "tenor sax": 66, "baritone sax": 67,
    "oboe": 68, "english horn": 69, "bassoon": 70, "clarinet": 71,
    "piccolo": 72, "flute": 73, "recorder": 74, "pan flute": 75, "whistle": 78, "ocarina": 79,
    "synth": 80, "lead": 80, "synth lead": 80, "square lead": 80, "saw lead": 81, "pad": 88, "synth pad": 88,
    "warm pad": 89,
    "sitar": 104, "banjo": 105, "shamisen": 106, "koto": 107, "kalimba": 108, "bagpipe": 109, "fiddle": 110,
    "steel drums": 114, "woodblock": 115, "taiko": 116, "synth drum": 118,
}
DRUM_WORDS = ("drums", "drum", "percussion", "drum kit")


def gm_name(key: int) -> str:
    """The General MIDI name of an instrument key (a program 0..127), or "Drums" for `DRUM_INSTRUMENT`."""
    return DRUMS_NAME if key == DRUM_INSTRUMENT else GM_NAMES[key]


def gm_family(program: int) -> str:
    return GM_FAMILIES[program // 8]


def _normal(word: str) -> str:
    return " ".join(word.strip().lower().replace("_", " ").replace("-", " ").split())


def parse_instruments(text: str) -> tuple[int, ...]:
    """Instrument keys named in a comma-separated flag value: numbers 0-127 (General MIDI programs), `drums`
    (128), common names (piano, bass, violin, ...) or full General MIDI names. Duplicates are kept once, in
    order. Anything else raises `MidigenError` with one line saying what is accepted."""
    full_names = {_normal(name): program for program, name in enumerate(GM_NAMES)}
    keys: list[int] = []
    for item in text.split(","):
        word = _normal(item)
        key: int | None
        if item.strip().isascii() and item.strip().isdigit():
            key = int(item) if int(item) < 128 else None
        elif word in DRUM_WORDS:
            key = DRUM_INSTRUMENT
        else:
            key = COMMON_NAMES.get(word, full_names.get(word))
        if key is None:
            accepted = ", ".join(sorted(COMMON_NAMES))
            raise MidigenError(
                f"unknown instrument {item.strip()!r} in {text!r}: give numbers 0-127 (General MIDI programs), "
                f"'drums', a General MIDI name or one of: {accepted}"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)


__all__ = ["COMMON_NAMES", "DRUMS_NAME", "GM_FAMILIES", "GM_NAMES", "gm_family", "gm_name", "parse_instruments"]
