"""`TokenizerConfig` and the vocabulary layout it implies."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from midigen.config import JsonConfig
from midigen.errors import MidigenError

NUM_PITCHES = 128
PAD_ID = 0  # padding, in every tokenizer's vocabulary: batches pad with it and the loss skips it


TOKENIZER_KINDS = ("seed", "remi", "tsd", "midilike")  # the seed's codec, then MidiTok's tokenizations
# The MidiTok parameters `miditok` may set: the others follow from the fields above, or add token types that the
# MidiTok kinds' grammar (`midigen.codec.miditok_kinds`) does not know.
# the kinds that take byte-pair merges: merged tokens fold through their grammar (`midigen.codec.bpe`); MIDI-Like's
# grammar state, a note-on step per instrument and pitch, is too wide to fold every merged token through at each step
MERGING_KINDS = ("seed", "remi", "tsd")
MIDITOK_PARAMS = ("pitch_range", "drum_pitch_range", "use_time_signatures", "time_signature_range")
GM_PROGRAMS = 128
MAX_VELOCITY_BINS = 127


@dataclass(frozen=True)
class TokenizerConfig(JsonConfig):
    """How MIDI becomes tokens.

    kind: the tokenizer family (`midigen.codec.load_tokenizer` builds it); "seed" is the seed's codec, "remi",
        "tsd" and "midilike" MidiTok's tokenizations (`midigen.codec.miditok_kinds`), which take the fields
        below where MidiTok can (steps, durations, bar length, instruments, drums, velocities, unisons).
    steps_per_quarter: grid resolution (8 = 32nd notes).
    max_duration: longest note or gap one duration token holds, in steps; longer notes are clamped,
        longer gaps are split into several `<sep> d` pairs.
    max_bar_quarters: bound on the position-in-bar embedding, in quarter notes: positions lie in
        [0, max_bar_quarters * steps_per_quarter); in longer bars (rare, e.g. 9/4) they wrap around.
    instruments: each note keeps its instrument (General MIDI program, or drums), and decoding writes one
        track per instrument; off, all kept notes become the seed's single piano stream.
    keep_drums: drum notes (MIDI channel 10) are kept (with `instruments`, as drum hits; without, as pitched
        notes of the one stream); off, they are dropped.
    velocity_bins: velocities are kept in this many equal bins of 1..127 (0: not kept; decoding writes
        `DEFAULT_VELOCITY`).
    tempo_qpm: tempo written by `decode` when the caller gives none.
    merge_unisons: notes of one pitch that start on the same step (most often voices or tracks in
        unison) of one instrument become one note, the longest, as in the seed's sparse score, which holds one
        note per step and pitch; a single instrument sounds the same. Off, every one is kept: they follow each
        other in their onset group, longest first, and `decode` writes each further one on an extra track.
    miditok: MidiTok parameters of a MidiTok kind beyond the fields above (`MIDITOK_PARAMS`), as JSON.
    merges: byte-pair merges across timesteps (`midigen.codec.bpe`), in the order learned: merged token
        `base size + i` stands for token `merges[i][0]` followed by token `merges[i][1]` (base or earlier merged
        ids); empty: the base tokens alone.
    merges_within_bars: merges are learned and applied inside each bar only, for comparison (off: across bars).
    """

    kind: str = "seed"
    steps_per_quarter: int = 8
    max_duration: int = 256
    max_bar_quarters: int = 8
    instruments: bool = True
    keep_drums: bool = True
    velocity_bins: int = 8
    tempo_qpm: float = 120.0
    merge_unisons: bool = True
    miditok: dict[str, Any] = field(default_factory=dict)
    merges: tuple[tuple[int, int], ...] = ()
    merges_within_bars: bool = False

    def __hash__(self) -> int:  # `miditok` is a dict: hash the config as saved (configs key caches)
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __post_init__(self) -> None:
        try:  # JSON gives lists
            object.__setattr__(self, "merges", tuple((int(left), int(right)) for left, right in self.merges))
        except (TypeError, ValueError):
            raise MidigenError("merges must be pairs of token ids") from None
        if self.kind not in TOKENIZER_KINDS:
            raise MidigenError(f"unknown tokenizer kind {self.kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
        if self.steps_per_quarter < 1:
            raise MidigenError(f"steps_per_quarter must be >= 1, got {self.steps_per_quarter}")
        if self.max_duration < 1:
            raise MidigenError(f"max_duration must be >= 1, got {self.max_duration}")
        if not self.tempo_qpm > 0:
            raise MidigenError(f"tempo_qpm must be > 0, got {self.tempo_qpm}")
        if self.max_bar_quarters < 1:
            raise MidigenError(f"max_bar_quarters must be >= 1, got {self.max_bar_quarters}")
        if not 0 <= self.velocity_bins <= MAX_VELOCITY_BINS:
            raise MidigenError(f"velocity_bins must be in 0..{MAX_VELOCITY_BINS}, got {self.velocity_bins}")
        if self.velocity_bins and not self.instruments:
            raise MidigenError("velocity_bins needs instruments: the single stream keeps no velocities")
        self._check_miditok()
        if self.kind == "seed":  # a MidiTok kind's base vocabulary is MidiTok's: its tokenizer checks the merges
            check_merges(self.merges, Vocab(self).size - len(self.merges))
        if self.kind == "seed" and Vocab(self).size > 2**16:
            raise MidigenError("vocabulary does not fit in uint16: lower max_duration")
        if self.beat_positions > 2**16:
            raise MidigenError("positions in a bar do not fit in uint16: lower max_bar_quarters or steps_per_quarter")

    @classmethod
    def from_saved(cls, data: dict[str, object]) -> TokenizerConfig:
        """A config as saved in a store, run or model folder. Those written before tokenizers had a `kind`
        (midigen 0.2 and earlier) describe the single-stream seed codec without velocities."""
        if isinstance(data, dict) and "kind" not in data:
            data = {**data, "kind": "seed", "instruments": False, "velocity_bins": 0}
        if isinstance(data, dict):  # written before byte-pair merges
            data = {"merges": [], "merges_within_bars": False, **data}
        if isinstance(data, dict) and "miditok" not in data:  # written before the MidiTok kinds
            data = {**data, "miditok": {}}
        return cls.from_dict(data, complete=True)

    def _check_miditok(self) -> None:
        """Refuse what the MidiTok kinds cannot do: steps are MidiTok's ticks, so every time signature is in
        quarters (x/4) and durations are whole quarters of steps."""
        if self.kind == "seed":
            if self.miditok:
                raise MidigenError("miditok parameters are for the MidiTok kinds (remi, tsd, midilike), not seed")
            return
        unknown = sorted(set(self.miditok) - set(MIDITOK_PARAMS))
        if unknown:
            raise MidigenError(f"miditok parameter(s) {', '.join(unknown)} not supported; allowed: "
                               f"{', '.join(MIDITOK_PARAMS)} (the others follow from the tokenizer's fields)")
        denominators = {str(key) for key in self.miditok.get("time_signature_range", {"4": ()})}
        if denominators != {"4"}:
            raise MidigenError(f"time_signature_range: only denominator 4 (x/4), got {sorted(denominators)}: a step is "
                               f"1/steps_per_quarter of a quarter, and MidiTok's positions in x/8 would be half steps")
        if self.merges and self.kind not in MERGING_KINDS:
            raise MidigenError(f"{self.kind}: takes no byte-pair merges ({', '.join(MERGING_KINDS)} do)")
        if self.max_duration % self.steps_per_quarter:
            raise MidigenError(f"{self.kind}: max_duration ({self.max_duration}) must be a multiple of "
                               f"steps_per_quarter ({self.steps_per_quarter}): MidiTok's durations span whole quarters")

    @property
    def beat_positions(self) -> int:
        """Number of distinct positions inside a bar (the size of the beat embedding)."""
        return self.max_bar_quarters * self.steps_per_quarter

    @cached_property
    def vocab(self) -> Vocab:
        """The seed codec's vocabulary (a MidiTok kind's is MidiTok's: ask its tokenizer, `load_tokenizer`)."""
        if self.kind != "seed":
            raise MidigenError(f"{self.kind}: the vocabulary is MidiTok's; ask the tokenizer for it")
        return Vocab(self)



def check_merges(merges: Sequence[tuple[int, int]], base_size: int) -> None:
    """Refuse a merge that names a token not defined before it (a base token or an earlier merge)."""
    for index, (left, right) in enumerate(merges):
        if not (0 <= left < base_size + index and 0 <= right < base_size + index):
            raise MidigenError(f"merge {index} ({left}, {right}) names a token that is not yet defined")

def describe_difference(saved: TokenizerConfig, other: TokenizerConfig) -> str:
    """The fields in which two configs differ, as "name: saved → other", for an error message."""
    fields = [name for name in saved.to_dict() if getattr(saved, name) != getattr(other, name)]

    def shown(config: TokenizerConfig, name: str) -> str:  # thousands of merges: their number says enough
        return f"{len(config.merges)} merges" if name == "merges" else repr(getattr(config, name))

    return ", ".join(f"{name}: {shown(saved, name)} → {shown(other, name)}" for name in fields) or "none"


class TokenFamilies:
    """Lookups over a vocabulary of `size` ids in contiguous families (`families`: name → its ids), the methods
    every tokenizer's vocabulary shares."""

    families: dict[str, range]
    size: int

    def ids_of(self, family: str) -> range:
        """The ids of a token family (empty for a family this vocabulary lacks)."""
        return self.families.get(family, range(0))

    def family_of(self, family: str) -> np.ndarray:
        """(V,) bool: which ids belong to `family`."""
        mask = np.zeros(self.size, dtype=bool)
        ids = self.ids_of(family)
        mask[ids.start : ids.stop] = True
        return mask


class Vocab(TokenFamilies):
    """Token ids, family after family: `<pad> <sos> <eos> <sep>`, notes `n0..n127`, durations
    `d1..d<max_duration>`; with instruments, `i0..i127` (General MIDI programs) and drum hits `h0..h127`;
    with velocities, `v1..v<velocity_bins>`; with byte-pair merges, the merged tokens `m0..`. Ids of the families
    present before them never move, so a single-stream vocabulary is a prefix of every other.

    Every offset between token families is computed here and nowhere else; callers ask `ids_of(family)`.
    """

    PAD, SOS, EOS, SEP = PAD_ID, 1, 2, 3
    SPECIALS = ("<pad>", "<sos>", "<eos>", "<sep>")

    def __init__(self, config: TokenizerConfig) -> None:
        sizes = {"special": len(self.SPECIALS), "note": NUM_PITCHES, "duration": config.max_duration}
        if config.instruments:
            sizes |= {"instrument": GM_PROGRAMS, "hit": NUM_PITCHES}
        if config.velocity_bins:
            sizes["velocity"] = config.velocity_bins
        if config.merges:
            sizes["merged"] = len(config.merges)
        self.families: dict[str, range] = {}
        start = 0
        for family, size in sizes.items():
            self.families[family] = range(start, start + size)
            start += size
        self.size = start
        self.max_duration = config.max_duration
        assert self.families["note"].start == self.SEP + 1

    def values(self) -> np.ndarray:
        """(V,) each token's value within its family: pitch of a note or hit, steps of a duration, program of an
        instrument, bin of a velocity (1-based), index of a special."""
        values = np.zeros(self.size, dtype=np.int64)
        for family, ids in self.families.items():
            values[ids.start : ids.stop] = np.arange(len(ids)) + (family in ("duration", "velocity"))
        return values

    def note(self, pitch: int) -> int:
        return self._id("note", pitch)

    def duration(self, steps: int) -> int:
        return self._id("duration", steps - 1)

    def instrument(self, program: int) -> int:
        return self._id("instrument", program)

    def hit(self, pitch: int) -> int:
        return self._id("hit", pitch)

    def velocity(self, bin_: int) -> int:
        return self._id("velocity", bin_ - 1)

    def _id(self, family: str, index: int) -> int:
        ids = self.ids_of(family)
        assert 0 <= index < len(ids), (family, index)
        return ids[index]

    def is_note(self, token: int) -> bool:
        return token in self.ids_of("note")

    def is_duration(self, token: int) -> bool:
        return token in self.ids_of("duration")

    def names(self) -> list[str]:
        """Human-readable name of every token id, in id order."""
        prefixes = {"note": "n", "duration": "d", "instrument": "i", "hit": "h", "velocity": "v", "merged": "m"}
        values = self.values()
        names = list(self.SPECIALS)
        for family, ids in self.families.items():
            if family != "special":
                names += [f"{prefixes[family]}{values[i]}" for i in ids]
        return names

    def describe(self, tokens: Iterable[int] | np.ndarray) -> list[str]:
        names = self.names()
        return [names[int(t)] for t in tokens]
