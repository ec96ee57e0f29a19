"""The studio's HTTP API against a real server (uvicorn in a thread of this process, so that tests can slow or
break the parser and the generation underneath it): generations equal in-process ones, notes stream before
the end, bad input gets a one-line 4xx and the server lives, the queue is bounded, a client that goes away
cancels its generation, audio prompts are transcribed in a process of their own; the queue itself; the CLI."""

from __future__ import annotations

import contextlib
import asyncio
import faulthandler
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
import symusic
import uvicorn

from midigen.cli.main import main
from midigen.codec import load_tokenizer, sandbox
from midigen.errors import MidigenError
from midigen.inference import SamplingConfig, generate, load_model, load_prompt
from midigen.inference.export import export_model
from midigen.inference.generate import generation_score
from midigen.studio import generation as generation_module
from midigen.studio import service as service_module
from midigen.studio.app import create_app
from midigen.studio.generation import MAX_UPLOAD_BYTES, notes_of
from midigen.studio.jobs import BusyError, Cancelled, JobQueue
from midigen.studio.models import ModelShelf
from midigen.studio.service import Studio
from midigen.studio.transcription import Transcriber

PROMPT = Path(__file__).parent / "data" / "prompts" / "Fuer_Elise_-_Ludwig_Van_Beethoven_-_Verse.mid"
MELODY = (60, 64, 67, 72, 67, 64, 62, 60)  # C E G C' G E D C


# ---- helpers shared with the browser tests ---------------------------------------------------------------
@contextmanager
def serving(studio: Studio) -> Iterator[str]:
    """`studio` served by uvicorn on a free port of the loopback, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(studio, allowed_hosts=("127.0.0.1",)), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the studio did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def write_melody(path: Path, pitches: tuple[int, ...] = MELODY, note_s: float = 0.4, sample_rate: int = 22050) -> Path:
    """A tune of sine tones, one after another, as a WAV: what a clean hummed tune looks like to basic-pitch."""
    t = np.arange(int(note_s * sample_rate)) / sample_rate
    fade = np.minimum(1.0, np.minimum(t, note_s - t) / 0.01)
    tones = [0.5 * fade * np.sin(2 * math.pi * 440 * 2 ** ((p - 69) / 12) * t) for p in pitches]
    soundfile.write(str(path), np.concatenate(tones), sample_rate, subtype="PCM_16")
    return path


def slowed_generation(monkeypatch: pytest.MonkeyPatch, seconds_per_token: float) -> None:
    """Make every sampled token take `seconds_per_token` longer (the real generation, slowed down), so that a
    test can act while a generation is still streaming."""
    real_generate = generation_module.generate

    def slow_generate(*args: Any, on_token: Callable[..., bool], **kwargs: Any) -> Any:
        def slow_on_token(event: Any) -> bool:
            time.sleep(seconds_per_token)
            return on_token(event)

        return real_generate(*args, on_token=slow_on_token, **kwargs)

    monkeypatch.setattr(generation_module, "generate", slow_generate)


def queue_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/api/health").json()["queue"]


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    studio = Studio([tiny_run], tmp_path_factory.mktemp("takes"), queue_capacity=1, device="cpu")
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def url(studio: Studio) -> Iterator[str]:
    with serving(studio) as base:
        yield base


def post(url: str, path: str = "/api/generations", files: dict[str, Any] | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", data={k: str(v) for k, v in fields.items()}, files=files, timeout=120)


def events_of(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: "):])


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and message.strip() == message and message
    for word in words:
        assert word in message, message


# ---- the queue -------------------------------------------------------------------------------------------
def test_job_queue_runs_in_order_refuses_past_its_bound_and_cancels() -> None:
    async def scenario() -> None:
        queue = JobQueue(capacity=2)
        gate = threading.Event()
        ran: list[str] = []

        def work(name: str) -> Callable[[Any], dict[str, Any]]:
            def run(job: Any) -> dict[str, Any]:
                if name == "first":
                    gate.wait(10)
                if name == "failing":
                    raise MidigenError("no notes")
                if name == "buggy":
                    raise ZeroDivisionError("oops")
                ran.append(name)
                job.emit("note", {"name": name})
                return {"name": name}
            return run

        first = queue.submit(work("first"))
        wait = asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(lambda: queue.stats()["running"]))
        await wait
        second, third = queue.submit(work("second")), queue.submit(work("third"))
        with pytest.raises(BusyError):
            queue.submit(work("fourth"))
        queue.cancel(second)  # waiting: dropped at once, which frees a place
        failing = queue.submit(work("failing"))
        gate.set()
        finals = {}
        for name, job in (("first", first), ("second", second), ("third", third), ("failing", failing)):
            kinds = [event async for event in job.events()]
            assert kinds[0].kind == "queued"
            finals[name] = kinds[-1]
        assert ran == ["first", "third"]
        assert (finals["first"].kind, finals["first"].data) == ("done", {"name": "first"})
        assert finals["second"].kind == "cancelled"
        assert finals["failing"].kind == "error" and finals["failing"].data["error"] == "no notes"
        buggy = queue.submit(work("buggy"))  # a bug costs its job, and the queue goes on
        assert [e async for e in buggy.events()][-1].data["error"] == "internal error: ZeroDivisionError: oops"
        last = queue.submit(work("last"))
        assert [e async for e in last.events()][-1].kind == "done"
        assert queue.stats() == {"running": False, "waiting": 0, "capacity": 2, "done": 3, "error": 2, "cancelled": 1}
        queue.close()

    asyncio.run(scenario())


def test_a_running_job_that_is_cancelled_stops() -> None:
    async def scenario() -> None:
        queue = JobQueue(capacity=0)
        started = threading.Event()

        def work(job: Any) -> dict[str, Any]:
            started.set()
            while not job.cancelled:
                time.sleep(0.01)
            raise Cancelled

        job = queue.submit(work)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        with pytest.raises(BusyError):  # capacity 0: nothing waits behind a running job
            queue.submit(work)
        queue.cancel(job)
        assert [e async for e in job.events()][-1].kind == "cancelled"
        queue.close()

    asyncio.run(scenario())


# ---- generations -----------------------------------------------------------------------------------------
def test_health_and_model_card(url: str, tiny_run: Path) -> None:
    health = httpx.get(f"{url}/api/health").json()
    assert health["status"] == "ok" and health["models"] == 1
    [card] = httpx.get(f"{url}/api/models").json()["models"]
    loaded = load_model(tiny_run, "cpu")
    assert card["name"] == tiny_run.name and card["kind"] == "run"
    assert card["parameters"] == loaded.model.num_parameters()
    assert card["val_nll"] == loaded.provenance["val_nll"] and card["training_steps"] == loaded.step
    assert card["store"]["songs"] == loaded.provenance["store"]["songs"]
    plot = httpx.get(url + card["loss_plot"])
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "midigen studio" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing from elsewhere


def test_a_generation_is_the_one_generate_gives_in_process(url: str, tiny_run: Path) -> None:
    response = post(url, files={"prompt": ("elise.mid", PROMPT.read_bytes())}, model=tiny_run.name, prompt_bars=2,
                    bars=3, temperature=0.9, top_p=0.95, seed=7, instruments=40)
    assert response.status_code == 200, response.text
    take = response.json()
    loaded = load_model(tiny_run, "cpu")
    tokenizer = load_tokenizer(loaded.tokenizer)
    expected = generate(loaded, load_prompt(PROMPT, 2, tokenizer), SamplingConfig(temperature=0.9, top_p=0.95, seed=7),
                        bars=3)
    score = generation_score(expected, tokenizer)
    prompt = notes_of(tokenizer.decode(expected.sequence.tokens[:expected.prompt_length], expected.tempos,
                                       expected.grid), 8)
    assert take["notes"] == notes_of(score, 8, prompt)
    assert sum(note["prompt"] for note in take["notes"]) == len(prompt)
    assert take["seed"] == 7 and take["new_tokens"] == len(expected.sequence) - expected.prompt_length
    assert take["time_limited"] is False
    assert any(n["prompt"] for n in take["notes"]) and any(not n["prompt"] for n in take["notes"])
    downloaded = httpx.get(url + take["mid"])
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "audio/midi"
    midi = symusic.Score.from_midi(downloaded.content)
    assert notes_of(midi, 8, prompt) == take["notes"]
    assert {track.program for track in midi.tracks} == {40}  # the instrument asked for
    assert httpx.get(f"{url}/api/generations/{take['id']}").json() == take
    png = httpx.get(url + take["png"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_generation_past_the_time_limit_keeps_what_it_has_and_says_so(url: str, tiny_run: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation_module, "MAX_RUN_SECONDS", 0.0)  # over as soon as it starts
    take = post(url, files={"prompt": ("elise.mid", PROMPT.read_bytes())}, model=tiny_run.name, bars=8, seed=3).json()
    assert take["time_limited"] is True
    assert take["new_tokens"] == 1  # stopped at its first token, which is kept
    assert any(note["prompt"] for note in take["notes"])


@pytest.mark.skipif(service_module._wav_rendering() != "ok", reason="fluidsynth or a SoundFont is missing (`make setup`)")
def test_a_take_renders_to_wav(url: str, tiny_run: Path) -> None:
    take = post(url, model=tiny_run.name, bars=1, seed=2).json()
    wav = httpx.get(url + take["wav"], timeout=120)
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF" and wav.content[8:12] == b"WAVE"
    assert len(wav.content) > 44 + 44100  # more than a quarter of a second of stereo sound


def test_notes_stream_before_the_generation_ends(url: str, tiny_run: Path) -> None:
    form = {"model": tiny_run.name, "prompt_bars": "2", "bars": "4", "seed": "11"}
    with httpx.stream("POST", f"{url}/api/generations/stream", data=form,
                      files={"prompt": ("elise.mid", PROMPT.read_bytes())}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(events_of(response))
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["queued", "start"] and kinds[-1] == "done" and "note" in kinds
    assert set(kinds[2:-1]) == {"note"}
    start, done = events[1][1], events[-1][1]
    assert start["prompt_notes"] == [n for n in done["notes"] if n["prompt"]]
    streamed = sorted((d["step"], -d["pitch"], d["length"]) for kind, d in events if kind == "note")
    continuation = sorted((n["step"], -n["pitch"], n["length"]) for n in done["notes"] if not n["prompt"])
    assert streamed == continuation


def test_the_shelf_offers_run_and_model_folders_and_reports_a_damaged_one(tiny_run: Path, tmp_path: Path) -> None:
    shelf_folder = tmp_path / "models"
    export_model(tiny_run, shelf_folder / "exported")
    (shelf_folder / "damaged").mkdir()
    (shelf_folder / "damaged" / "config.json").write_text("{not json")
    (shelf_folder / "notes").mkdir()  # not a model: not offered
    (tmp_path / "other" / tiny_run.name).mkdir(parents=True)
    (tmp_path / "other" / tiny_run.name / "config.json").write_text("{}")  # a second folder of the same name
    shelf = ModelShelf([tiny_run, shelf_folder, tmp_path / "other"], device="cpu")
    assert shelf.folders() == {tiny_run.name: tiny_run, "damaged": shelf_folder / "damaged",
                               "exported": shelf_folder / "exported", f"{tiny_run.name}-2": tmp_path / "other" / tiny_run.name}
    exported = shelf.card("exported")
    assert exported["kind"] == "model" and exported["loss_plot"] is None
    assert {k: v for k, v in exported.items() if k not in ("name", "kind", "loss_plot")} == {
        k: v for k, v in shelf.card(tiny_run.name).items() if k not in ("name", "kind", "loss_plot")}
    damaged = shelf.card("damaged")
    assert set(damaged) == {"name", "error"} and "not readable JSON" in damaged["error"] and "\n" not in damaged["error"]
    with pytest.raises(MidigenError, match="model damaged: .*not readable JSON"):
        shelf.load("damaged")
    with pytest.raises(MidigenError, match=r"model: no model called '\.\./exported'"):
        shelf.load("../exported")


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "words"), [
    ({"evil": "1"}, ("unknown form field", "evil")),
    ({"model": ""}, ("model: missing",)),
    ({"model": "../tiny"}, ("model: no model called '../tiny'",)),
    ({"model": "/etc"}, ("no model called",)),
    ({"model": ".."}, ("no model called",)),
    ({"model": "tiny/../../etc"}, ("no model called",)),
    ({"bars": "0"}, ("bars: must be from 1 to 64",)),
    ({"bars": "1000"}, ("bars: must be from 1 to 64",)),
    ({"bars": "many"}, ("bars: expected a whole number",)),
    ({"prompt_bars": "-2"}, ("prompt_bars",)),
    ({"temperature": "nan"}, ("temperature",)),
    ({"temperature": "-1"}, ("temperature",)),
    ({"top_p": "0"}, ("top_p",)),
    ({"top_p": "1.5"}, ("top_p",)),
    ({"seed": "-1"}, ("seed",)),
    ({"instruments": "0,40"}, ("instruments: this model writes one stream",)),
    ({"instruments": "200"}, ("instruments",)),
    ({"take": "../../etc/passwd"}, ("take: not a take id",)),
])
def test_bad_fields_are_refused_in_one_line(url: str, tiny_run: Path, fields: dict[str, str], words: tuple[str, ...]
                                            ) -> None:
    assert_refused(post(url, **{"model": tiny_run.name, **fields}), 400, *words)
    assert httpx.get(f"{url}/api/health").json()["status"] == "ok"


def test_a_field_given_twice_and_unknown_takes_are_refused(url: str, tiny_run: Path) -> None:
    twice = httpx.post(f"{url}/api/generations", content=f"model={tiny_run.name}&bars=1&bars=2",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert_refused(twice, 400, "more than once", "bars")
    assert_refused(post(url, model=tiny_run.name, take="0" * 32), 404, "no take")


@pytest.mark.parametrize(("name", "data", "words"), [
    ("empty.mid", b"", ("prompt empty.mid: empty file",)),
    ("notes.txt", b"C D E F G\n", ("prompt notes.txt: neither a MIDI file nor audio",)),
    ("truncated.mid", PROMPT.read_bytes()[:40], ("prompt truncated.mid: malformed MIDI",)),
    ("garbage.mid", b"MThd" + bytes(range(256)) * 8, ("prompt garbage.mid",)),
    ("../../../etc/passwd", b"root:x:0:0", ("prompt passwd: neither",)),
    ("noise.wav", b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x07" * 64, ("prompt noise.wav: not audio that can be read",)),
])
def test_bad_uploads_are_refused_in_one_line(url: str, tiny_run: Path, name: str, data: bytes,
                                             words: tuple[str, ...]) -> None:
    assert_refused(post(url, files={"prompt": (name, data)}, model=tiny_run.name, bars=1), 400, *words)
    assert httpx.get(f"{url}/api/health").json()["status"] == "ok"


def test_uploads_over_the_limit_or_of_unknown_length_are_refused(url: str, tiny_run: Path) -> None:
    huge = post(url, files={"prompt": ("huge.mid", b"MThd" + bytes(MAX_UPLOAD_BYTES))}, model=tiny_run.name)
    assert_refused(huge, 413, "limited to 16 MiB")

    def chunked() -> Iterator[bytes]:
        yield b"model=tiny"

    unknown_length = httpx.post(f"{url}/api/generations", content=chunked(),
                                headers={"content-type": "application/x-www-form-urlencoded"})
    assert_refused(unknown_length, 411, "Content-Length")
    as_text = post(url, model=tiny_run.name, prompt="not a file")
    assert_refused(as_text, 400, "prompt: send a file")


def crash_or_hang_on(name: str, failure: str) -> Callable[[str], Any]:
    """A stand-in for the sandbox's parser that crashes or hangs on files called `name` (the forked parser
    process inherits it)."""
    real_parse_one = sandbox.parse_one

    def parse_one(path: str) -> Any:
        if Path(path).read_bytes() == PROMPT.read_bytes() + name.encode():
            if failure == "crash":
                faulthandler.disable()
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(60)
        return real_parse_one(path)

    return parse_one


@contextlib.contextmanager
def parsers_forked_with(studio: Studio, parse_one: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The studio's parsers of uploads start afresh, their kept workers forked with `parse_one` standing in for
    the parser, and are closed at the end."""
    monkeypatch.setattr(sandbox, "parse_one", parse_one)
    fresh: dict[Any, Any] = {}
    monkeypatch.setattr(studio, "_parsers", fresh)
    try:
        yield
    finally:
        for parser in fresh.values():
            parser.close()


@pytest.mark.parametrize(("failure", "words"), [("crash", ("parser crashed: SIGSEGV",)), ("hang", ("timed out",))])
def test_a_file_that_crashes_or_hangs_the_parser_costs_only_its_request(
        url: str, studio: Studio, tiny_run: Path, monkeypatch: pytest.MonkeyPatch, failure: str,
        words: tuple[str, ...]) -> None:
    # the parser's stand-in knows the poisoned file by its content (the upload's name never reaches the disk)
    poisoned = PROMPT.read_bytes() + b"poison"
    monkeypatch.setattr(service_module, "PARSE_TIMEOUT_S", 1.0)
    with parsers_forked_with(studio, crash_or_hang_on("poison", failure), monkeypatch):
        assert_refused(post(url, files={"prompt": ("evil.mid", poisoned)}, model=tiny_run.name, bars=1), 400,
                       "prompt evil.mid", *words)
        for _ in range(2):  # the next uploads are parsed by a fresh worker, which is then kept
            fine = post(url, files={"prompt": ("elise.mid", PROMPT.read_bytes())}, model=tiny_run.name, bars=1, seed=1)
            assert fine.status_code == 200, fine.text


def test_downloads_cannot_leave_the_takes(url: str) -> None:
    for path in ("/api/generations/..%2F..%2F..%2Fetc%2Fpasswd.mid", "/api/generations/" + "0" * 32 + ".mid",
                 "/api/generations/" + "a" * 32 + ".exe", "/api/generations/%2e%2e.mid", "/api/models/tiny/..%2F..%2Fx"):
        response = httpx.get(url + path)
        assert response.status_code == 404, path
        assert "\n" not in response.json()["error"]


# ---- load: the queue's bound, and clients that go away ---------------------------------------------------
@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Generations wait for the returned gate before they start (the real generation runs once it opens)."""
    gate = threading.Event()
    real = service_module.run_generation

    def gated_run(job: Any, *args: Any) -> Any:
        gate.wait(60)
        return real(job, *args)

    monkeypatch.setattr(service_module, "run_generation", gated_run)
    yield gate
    gate.set()


def test_a_full_queue_refuses_with_429_and_closed_streams_cancel_their_generations(
        url: str, tiny_run: Path, gated: threading.Event) -> None:
    before = queue_stats(url)
    # long enough that the server sees the running client gone before the generation could finish on its own
    form = {"model": tiny_run.name, "bars": "64", "seed": "1"}
    with httpx.Client(timeout=60) as client:
        # (each stream's events are read through one iterator: dropping an iterator that has not reached the end
        # closes its response, which is a client going away)
        with client.stream("POST", f"{url}/api/generations/stream", data=form) as running:
            running_events = events_of(running)
            assert next(running_events)[0] == "queued"
            wait_for(lambda: queue_stats(url)["running"])
            with client.stream("POST", f"{url}/api/generations/stream", data=form) as waiting:
                waiting_events = events_of(waiting)
                kind, queued = next(waiting_events)
                assert (kind, queued["ahead"]) == ("queued", 1)
                assert_refused(post(url, **form), 429, "busy")  # capacity 1: one runs, one waits, the next is refused
                assert httpx.get(f"{url}/api/health").json()["status"] == "ok"  # the server stays responsive
            # the waiting client has gone: its generation is dropped
            wait_for(lambda: queue_stats(url)["cancelled"] == before["cancelled"] + 1)
        gated.set()  # the running generation's client has gone too: it stops at its first token
        wait_for(lambda: queue_stats(url)["cancelled"] == before["cancelled"] + 2 and not queue_stats(url)["running"])
    assert queue_stats(url)["done"] == before["done"]


def test_a_client_that_goes_away_cancels_its_generation(url: str, tiny_run: Path, studio: Studio,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    slowed_generation(monkeypatch, seconds_per_token=0.2)
    before = queue_stats(url)
    form = {"model": tiny_run.name, "bars": "64", "seed": "1"}
    with httpx.stream("POST", f"{url}/api/generations/stream", data=form, timeout=60) as response:
        events = events_of(response)
        take_id = next(events)[1]["id"]
        assert next(events)[0] == "start"
    wait_for(lambda: queue_stats(url)["cancelled"] == before["cancelled"] + 1)
    assert not (studio.takes.folder / f"{take_id}.mid").exists()  # a cancelled generation leaves no take
    # the same for a client waiting for the whole result, which gives up after a second
    with pytest.raises(httpx.ReadTimeout):
        post_with_timeout(url, form, timeout_s=1.0)
    wait_for(lambda: queue_stats(url)["cancelled"] == before["cancelled"] + 2)
    assert queue_stats(url)["done"] == before["done"] and not queue_stats(url)["running"]


def post_with_timeout(url: str, form: dict[str, str], timeout_s: float) -> httpx.Response:
    return httpx.post(f"{url}/api/generations", data=form, timeout=timeout_s)


# ---- audio -----------------------------------------------------------------------------------------------
def test_an_audio_clip_becomes_a_prompt(url: str, tiny_run: Path, tmp_path: Path) -> None:
    clip = write_melody(tmp_path / "hummed.wav")
    transcribed = httpx.post(f"{url}/api/transcriptions", files={"audio": ("hummed.wav", clip.read_bytes())},
                             timeout=300)
    assert transcribed.status_code == 200, transcribed.text
    take = transcribed.json()
    assert [n["pitch"] for n in take["notes"]] == list(MELODY)
    midi = symusic.Score.from_midi(httpx.get(url + take["mid"]).content)
    assert sorted(n.pitch for t in midi.tracks for n in t.notes) == sorted(MELODY)
    continued = post(url, model=tiny_run.name, take=take["id"], prompt_bars=4, bars=1, seed=1)
    assert continued.status_code == 200, continued.text
    assert [n["pitch"] for n in continued.json()["notes"] if n["prompt"]] == list(MELODY)
    direct = post(url, files={"prompt": ("hummed.wav", clip.read_bytes())}, model=tiny_run.name, bars=1, seed=1)
    assert direct.status_code == 200, direct.text
    assert [n["pitch"] for n in direct.json()["notes"] if n["prompt"]] == list(MELODY)


def test_bad_audio_is_refused_in_one_line(url: str, tmp_path: Path) -> None:
    def send(name: str, data: bytes) -> httpx.Response:
        return httpx.post(f"{url}/api/transcriptions", files={"audio": (name, data)}, timeout=120)

    assert_refused(send("bad.wav", b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x03" * 100), 400, "bad.wav: not audio")
    assert_refused(send("song.mid", PROMPT.read_bytes()), 400, "a MIDI file, not audio")
    silence = tmp_path / "silence.wav"
    soundfile.write(str(silence), np.zeros(22050), 22050)
    assert_refused(send("silence.wav", silence.read_bytes()), 400, "silence.wav: no notes heard")
    assert_refused(httpx.post(f"{url}/api/transcriptions", data={"audio": "x"}), 400, "audio: send a file")
    assert httpx.get(f"{url}/api/health").json()["status"] == "ok"


def test_the_transcriber_survives_a_worker_that_dies(tmp_path: Path) -> None:
    transcriber = Transcriber()
    try:
        clip = write_melody(tmp_path / "tune.wav")
        assert transcriber.transcribe(clip, tmp_path / "first.mid") == len(MELODY)
        os.kill(transcriber._process.pid, signal.SIGKILL)  # what a decoder's crash on a clip looks like from outside
        with pytest.raises(MidigenError) as failure:
            transcriber.transcribe(clip, tmp_path / "second.mid")
        assert str(failure.value) == f"{clip}: the audio decoder crashed (SIGKILL)"
        assert transcriber.transcribe(clip, tmp_path / "third.mid") == len(MELODY)  # a new worker, warmed up again
    finally:
        transcriber.close()


# ---- command line ----------------------------------------------------------------------------------------
def test_transcribe_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = write_melody(tmp_path / "tune.flac")
    assert main(["transcribe", str(clip), "-o", str(tmp_path / "tune.mid")]) == 0
    midi = symusic.Score(str(tmp_path / "tune.mid"))
    assert [n.pitch for n in sorted((n for t in midi.tracks for n in t.notes), key=lambda n: n.time)] == list(MELODY)
    assert main(["transcribe", str(PROMPT), "-o", str(tmp_path / "x.mid")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{PROMPT}: not audio that can be read" in error
    assert not (tmp_path / "x.mid").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_studio_command_serves_until_interrupted(tiny_run: Path, tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "midigen", "studio", str(tiny_run.parent), "--port", str(port),
                                "--no-audio", "--takes", str(tmp_path / "takes")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"midigen studio: http://127.0.0.1:{port}/")
        health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=30).json()
        assert health["audio_prompts"] == "off" and health["models"] >= 1
        take = httpx.post(f"http://127.0.0.1:{port}/api/generations", data={"model": tiny_run.name, "bars": "1"},
                          timeout=120).json()
        assert (tmp_path / "takes" / f"{take['id']}.mid").is_file()  # --takes keeps them
        assert httpx.get(f"http://127.0.0.1:{port}/", headers={"host": "evil.example"}).status_code == 400
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    bad = subprocess.run([sys.executable, "-m", "midigen", "studio", str(tmp_path / "nowhere")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere: not a run or model folder" in bad.stderr
