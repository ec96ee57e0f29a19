"""`Studio`: the models, the generation queue, the takes and the transcriber of one studio, and what the
HTTP API asks of them. Nothing here knows of HTTP; `midigen.studio.app` maps it onto routes."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midigen import __version__
from midigen.codec.config import TokenizerConfig
from midigen.codec.midi_io import load_score
from midigen.codec.registry import load_tokenizer
from midigen.codec.sandbox import IsolatedEncoder
from midigen.errors import MidigenError
from midigen.evaluation.render import find_fluidsynth, find_soundfont
from midigen.inference.generate import Prompt, empty_prompt
from midigen.inference.model_files import LoadedModel
from midigen.studio.generation import GenerationRequest, notes_of, prompt_from_midi, run_generation, upload_suffix, urls
from midigen.studio.jobs import BusyError, Job, JobQueue
from midigen.studio.models import ModelShelf
from midigen.studio.takes import Takes, new_take_id
from midigen.studio.transcription import TEMPO_QPM, Transcriber

DEFAULT_QUEUE = 4  # generations that may wait behind the running one
TRANSCRIPTIONS_WAITING = 4  # clips that may wait for the transcriber
PARSE_TIMEOUT_S = 10.0  # a MIDI upload the parser has not finished with by then is refused
UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w.\- ]")


@dataclass(frozen=True)
class Upload:
    """A file a client sent: the name it gave (shown in messages only) and its bytes."""

    name: str
    data: bytes

    @property
    def shown_name(self) -> str:
        base = self.name.replace("\\", "/").rsplit("/", 1)[-1]
        return UNSAFE_NAME_CHARACTERS.sub("_", base)[:80] or "upload"


class Studio:
    def __init__(self, places: Sequence[str | Path], takes_folder: str | Path | None = None,
                 queue_capacity: int = DEFAULT_QUEUE, device: str = "auto", audio: bool = True) -> None:
        self.shelf = ModelShelf(places, device)
        if not self.shelf.folders():
            raise MidigenError(f"no run or model folder in {', '.join(map(str, places))} (each holds config.json)")
        self._scratch = Path(tempfile.mkdtemp(prefix="midigen-studio-"))
        self.takes = Takes(takes_folder if takes_folder is not None else self._scratch / "takes")
        self.jobs = JobQueue(queue_capacity)
        self.transcriber = Transcriber() if audio else None  # it starts warming up now, in its own process
        self._transcription_slots = threading.BoundedSemaphore(TRANSCRIPTIONS_WAITING)
        self._parsers: dict[TokenizerConfig, IsolatedEncoder] = {}  # one kept worker per tokenizer the models use
        self._parsers_lock = threading.Lock()

    def _parser(self, loaded: LoadedModel) -> IsolatedEncoder:
        with self._parsers_lock:
            if loaded.tokenizer not in self._parsers:
                self._parsers[loaded.tokenizer] = IsolatedEncoder(loaded.tokenizer, PARSE_TIMEOUT_S)
            return self._parsers[loaded.tokenizer]

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "models": len(self.shelf.folders()),
                "queue": self.jobs.stats(), "audio_prompts": self.transcriber.state if self.transcriber else "off",
                "wav": _wav_rendering()}

    def models(self) -> list[dict[str, Any]]:
        return [self.shelf.card(name) for name in self.shelf.folders()]

    def prepare(self, request: GenerationRequest, upload: Upload | None) -> tuple[LoadedModel, Prompt]:
        """The model and the prompt of a request (blocking: loads, parses, transcribes)."""
        loaded = self.shelf.load(request.model)
        if upload is not None and request.take is not None:
            raise MidigenError("give a prompt file or a take to continue, not both")
        if request.take is not None:
            return loaded, prompt_from_midi(self.takes.midi(request.take), f"take {request.take[:8]}",
                                            request.prompt_bars, loaded, self._parser(loaded))
        if upload is None:
            return loaded, empty_prompt(load_tokenizer(loaded.tokenizer))
        suffix = upload_suffix(upload.shown_name, upload.data)
        with tempfile.TemporaryDirectory(dir=self._scratch) as scratch:
            path = Path(scratch) / f"prompt{suffix}"
            path.write_bytes(upload.data)
            if suffix != ".mid":
                self._transcribe(path, path.with_suffix(".mid"), upload.shown_name)
                path = path.with_suffix(".mid")
            return loaded, prompt_from_midi(path, upload.shown_name, request.prompt_bars, loaded, self._parser(loaded))

    def submit(self, loaded: LoadedModel, prompt: Prompt, request: GenerationRequest) -> Job:
        """Queue the generation (from the event loop); `BusyError` when the queue is full."""
        return self.jobs.submit(lambda job: run_generation(job, loaded, request.model, prompt, request, self.takes))

    def transcription(self, upload: Upload) -> dict[str, Any]:
        """An audio clip transcribed and kept as a take (to hear, download, or continue with `take`)."""
        suffix = upload_suffix(upload.shown_name, upload.data)
        if suffix == ".mid":
            raise MidigenError(f"audio {upload.shown_name}: a MIDI file, not audio (give it as a generation's prompt)")
        take_id = new_take_id()
        with tempfile.TemporaryDirectory(dir=self._scratch) as scratch:
            path = Path(scratch) / f"clip{suffix}"
            path.write_bytes(upload.data)
            self._transcribe(path, path.with_suffix(".mid"), upload.shown_name)
            score = load_score(path.with_suffix(".mid"))  # written by basic-pitch from numbers, not parsed from the upload
        steps_per_quarter = TokenizerConfig().steps_per_quarter
        info = {"id": take_id, "kind": "transcription", "title": f"{upload.shown_name} transcribed",
                "tempo_qpm": TEMPO_QPM, "steps_per_quarter": steps_per_quarter,
                "seconds_per_step": 60.0 / (TEMPO_QPM * steps_per_quarter),
                "notes": notes_of(score, steps_per_quarter), **urls(take_id)}
        self.takes.save(take_id, score, info)
        return info

    def _transcribe(self, audio: Path, midi: Path, shown_name: str) -> None:
        if self.transcriber is None:
            raise MidigenError(f"prompt {shown_name}: audio prompts are off in this studio")
        if not self._transcription_slots.acquire(blocking=False):
            raise BusyError(f"busy: {TRANSCRIPTIONS_WAITING} audio clips are already being transcribed; try again shortly")
        try:
            self.transcriber.transcribe(audio, midi)
        except MidigenError as exc:
            raise MidigenError(f"prompt {shown_name}: {str(exc).removeprefix(f'{audio}: ')}") from None
        finally:
            self._transcription_slots.release()

    def close(self) -> None:
        self.jobs.close()
        for parser in self._parsers.values():
            parser.close()
        if self.transcriber is not None:
            self.transcriber.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _wav_rendering() -> str:
    try:
        find_fluidsynth(), find_soundfont()
    except MidigenError as exc:
        return f"unavailable: {exc}"
    return "ok"
