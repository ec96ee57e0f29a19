"""A studio generation: its parameters read from a form, its prompt from an upload, and the run itself,
which streams each note to the page as it is sampled and keeps the result as a take.

Uploads are untrusted: a MIDI file is parsed first in a worker process kept between uploads, under the watchdog
that `encode` uses, so that a file that crashes or hangs the parser costs that request and not the studio; audio is
transcribed in the transcriber's own worker process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import symusic

from midigen.codec.sandbox import IsolatedEncoder
from midigen.codec.instruments import parse_instruments
from midigen.codec.midi_io import DRUM_INSTRUMENT
from midigen.codec.registry import load_tokenizer
from midigen.errors import BadMidiError, MidigenError
from midigen.inference.generate import Prompt, TokenEvent, generate, generation_score, load_prompt
from midigen.inference.model_files import LoadedModel
from midigen.inference.sampling import SamplingConfig
from midigen.studio.jobs import Cancelled, Job
from midigen.studio.takes import TAKE_ID, Takes

MAX_UPLOAD_BYTES = 16 * 2**20  # a prompt file, MIDI or audio
MAX_BARS = 64  # bars to generate, and bars of a prompt
MAX_RUN_SECONDS = 300.0  # wall-clock time a generation may take before it stops with what it has
TEXT_FIELDS = ("model", "take", "prompt_bars", "bars", "temperature", "top_p", "seed", "instruments")


class UploadTooLarge(MidigenError):
    """An upload over `MAX_UPLOAD_BYTES` (HTTP 413)."""


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for: the model, what to continue and how, and the instrument to write it with."""

    model: str
    prompt_bars: int = 4
    bars: int = 8
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    instruments: tuple[int, ...] = ()  # General MIDI programs (128: drums) to play; () lets the model choose
    take: str | None = None  # continue this take instead of an upload

    @classmethod
    def from_form(cls, fields: Mapping[str, str]) -> GenerationRequest:
        """Parse a form's text fields; a missing, unknown or bad field gets a one-line `MidigenError`."""
        if not fields.get("model"):
            raise MidigenError("model: missing (choose one of GET /api/models)")
        take = fields.get("take") or None
        if take is not None and not TAKE_ID.fullmatch(take):
            raise MidigenError(f"take: not a take id: {take[:40]!r}")
        try:
            sampling = SamplingConfig(temperature=_number(fields, "temperature", 1.0, 0.0, 5.0),
                                      top_p=_number(fields, "top_p", 1.0, 0.0, 1.0),
                                      seed=_integer(fields, "seed", None, 0, 2**62 - 2**16))
        except MidigenError as exc:
            raise MidigenError(str(exc).replace("top-p", "top_p")) from None
        return cls(model=fields["model"], prompt_bars=_integer(fields, "prompt_bars", 4, 1, MAX_BARS),
                   bars=_integer(fields, "bars", 8, 1, MAX_BARS), sampling=sampling,
                   instruments=_instruments(fields.get("instruments")), take=take)


def check_field_names(names: list[str], text_fields: Sequence[str], file_field: str) -> None:
    """Refuse a form with a field the endpoint does not have, or one given twice."""
    known = [*text_fields, file_field]
    unknown = sorted({name for name in names if name not in known})
    if unknown:
        raise MidigenError(f"unknown form field(s): {', '.join(n[:40] for n in unknown)} (known: {', '.join(known)})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MidigenError(f"form field(s) given more than once: {', '.join(repeated)}")


def _integer(fields: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> Any:
    text = fields.get(name, "")
    if text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise MidigenError(f"{name}: expected a whole number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise MidigenError(f"{name}: must be from {low} to {high}, got {value}")
    return value


def _number(fields: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    text = fields.get(name, "")
    if text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise MidigenError(f"{name}: expected a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise MidigenError(f"{name}: must be from {low:g} to {high:g}, got {text[:40]}")
    return value


def _instruments(text: str | None) -> tuple[int, ...]:
    """`instruments`: General MIDI programs and `drums`, comma-separated (e.g. "0,33,drums" or "piano,bass")."""
    if not text:
        return ()
    try:
        return parse_instruments(text)
    except MidigenError as exc:
        raise MidigenError(f"instruments: {exc}") from None


def upload_suffix(name: str, data: bytes) -> str:
    """The file type of an upload, from its first bytes (never its name): ".mid", or ".wav", ".flac", ".ogg" or
    ".mp3" for audio; a one-line `MidigenError` for an empty, oversized or unknown file."""
    if not data:
        raise MidigenError(f"prompt {name}: empty file (0 bytes)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"prompt {name}: {len(data) / 2**20:.1f} MiB; uploads are limited to "
                             f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    head = data[:16]
    riff = head[8:12] if head.startswith(b"RIFF") else b""
    if head.startswith(b"MThd") or riff == b"RMID":
        return ".mid"
    for suffix, matches in ((".wav", riff == b"WAVE"), (".flac", head.startswith(b"fLaC")),
                            (".ogg", head.startswith(b"OggS")),
                            # an ID3 tag, or an MPEG audio frame's sync bits
                            (".mp3", head.startswith(b"ID3") or (head[0] == 0xFF and len(head) > 1 and head[1] >= 0xE0))):
        if matches:
            return suffix
    raise MidigenError(f"prompt {name}: neither a MIDI file nor audio (WAV, FLAC, MP3 or OGG)")


def prompt_from_midi(path: Path, shown_name: str, bars: int, loaded: LoadedModel, parser: IsolatedEncoder) -> Prompt:
    """The first `bars` bars of an untrusted MIDI file, parsed first by `parser` (in its worker process, with the
    model's tokenizer)."""
    try:
        parser.encode(path)
        return load_prompt(path, bars, load_tokenizer(loaded.tokenizer))  # now known to parse safely
    except BadMidiError as exc:
        raise BadMidiError(f"prompt {shown_name}", exc.reason) from None


def notes_of(score: symusic.Score, steps_per_quarter: int, prompt: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """A score's notes on the step grid, as the page draws them: pitch, onset step, length in steps, and whether
    the note is one of the `prompt`'s notes (a continuation may add notes to the prompt's last chord, so where
    a note starts does not tell)."""
    ticks_per_step = score.ticks_per_quarter // steps_per_quarter
    rows = [track.notes.numpy() for track in score.tracks if track.note_num()]
    if not rows:
        return []
    steps = np.concatenate([r["time"] for r in rows]).astype(np.int64) // ticks_per_step
    lengths = np.maximum(1, np.concatenate([r["duration"] for r in rows]).astype(np.int64) // ticks_per_step)
    pitches = np.concatenate([r["pitch"] for r in rows]).astype(np.int64)
    order = np.lexsort((-pitches, steps))
    from_prompt = {(note["pitch"], note["step"], note["length"]) for note in prompt}
    return [{"pitch": int(p), "step": int(s), "length": int(n), "prompt": (int(p), int(s), int(n)) in from_prompt}
            for p, s, n in zip(pitches[order], steps[order], lengths[order])]


def timeline(prompt: Prompt, bars: int, steps_per_quarter: int) -> dict[str, Any]:
    """How the page lays out steps in time: its tempo and where the bars start."""
    return {"tempo_qpm": prompt.tempo_qpm, "steps_per_quarter": steps_per_quarter,
            "seconds_per_step": 60.0 / (prompt.tempo_qpm * steps_per_quarter),
            "bar_steps": [prompt.grid.bar_start(bar) for bar in range(prompt.bars + bars + 1)],
            "continuation_step": prompt.end_step}


class NoteStreamer:
    """`generate`'s `on_token`: emits each note as it is completed, and stops the generation when the job is
    cancelled or past its deadline (then `timed_out` is True)."""

    def __init__(self, job: Job, deadline: float) -> None:
        self.job, self.deadline, self.timed_out = job, deadline, False

    def __call__(self, event: TokenEvent) -> bool:
        for note in event.notes:
            self.job.emit("note", {"pitch": note.pitch, "step": note.step, "length": note.length, "bar": event.bar,
                                   "instrument": note.instrument})
        self.timed_out = self.timed_out or time.monotonic() > self.deadline
        return self.job.cancelled or self.timed_out


def run_generation(job: Job, loaded: LoadedModel, model_name: str, prompt: Prompt, request: GenerationRequest,
                   takes: Takes) -> dict[str, Any]:
    """Continue `prompt`, streaming notes as `job` events; keep the result as take `job.id` and return what the
    page is told of it."""
    tokenizer = load_tokenizer(loaded.tokenizer)
    config = loaded.tokenizer
    if not config.instruments and (len(request.instruments) > 1 or DRUM_INSTRUMENT in request.instruments):
        raise MidigenError("instruments: this model writes one stream of notes; give one General MIDI program")
    layout = timeline(prompt, request.bars, config.steps_per_quarter)
    prompt_score = tokenizer.decode(prompt.sequence, prompt.tempos, prompt.grid)
    prompt_notes = [{**note, "prompt": True} for note in notes_of(prompt_score, config.steps_per_quarter)]
    job.emit("start", {"id": job.id, **layout, "prompt_notes": prompt_notes})
    streamer = NoteStreamer(job, time.monotonic() + MAX_RUN_SECONDS)
    generation = generate(loaded, prompt, request.sampling, bars=request.bars, on_token=streamer,
                          instruments=(request.instruments or None) if config.instruments else None)
    if job.cancelled:
        raise Cancelled
    score = generation_score(generation, tokenizer)
    if score.note_num() == 0:
        raise MidigenError("the generation holds no notes: try another seed or a higher temperature")
    program = request.instruments[0] if request.instruments else 0
    if not config.instruments:  # the single stream is written as a piano: play it with the chosen program
        for track in score.tracks:
            track.program = program
    continuation = generation.continuation_step if generation.prompt_length > 1 else 0
    info = {"id": job.id, "kind": "generation", "model": model_name, "title": f"{model_name} take {job.id[:8]}",
            **layout, "continuation_step": continuation,
            "notes": notes_of(score, config.steps_per_quarter, prompt_notes),
            "new_tokens": len(generation.sequence) - generation.prompt_length, "seed": generation.seed,
            "time_limited": streamer.timed_out,  # cut short by MAX_RUN_SECONDS, with what it had
            "program": program, **urls(job.id)}
    takes.save(job.id, score, info)
    return info


def urls(take_id: str) -> dict[str, str]:
    return {kind: f"/api/generations/{take_id}.{kind}" for kind in ("mid", "wav", "png")}
