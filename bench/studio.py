"""The studio on CPU: `midigen studio` in a process of its own, asked over HTTP as its page asks it.

The model is the `small` preset trained for one step (speed does not depend on the weights), in .bench/studio/.

1. Time to the first streamed note after Generate, continuing a 4-bar MIDI upload.
2. Tokens/s through the server (POST /api/generations: upload, parsing in the sandbox, generation, writing the take,
   HTTP) against what `midigen generate` does in process once its model is loaded (read the prompt, generate, write
   the MIDI file), on a worker thread as the studio runs it, with the same prompt and seed (the same tokens,
   checked). Goal: the server's overhead at most 10%.
3. Jam: from the phrase's POST (the page sends it when the silence ends the phrase) to the first note of the
   answer on the stream. Goal: at most 300 ms.
4. Transcription (POST /api/transcriptions, basic-pitch on onnxruntime, warmed up at the studio's start): seconds
   per second of audio, on FluidSynth renderings of real MIDI files.

Contenders run in interleaved rounds; figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import symusic
import torch
from common import CACHE, QUICK_BENCHMARKS, ROOT, cpu_name, write_section

from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.evaluation.render import render_wav
from midigen.inference import SamplingConfig, generate, load_model, load_prompt, write_generation

PROMPTS = ROOT / "tests" / "data" / "prompts"
PROMPT = PROMPTS / "Canon_In_D_Major_-_Johann_Pachelbel_-_Chorus.mid"
CLIPS = (PROMPTS / "Fuer_Elise_-_Ludwig_Van_Beethoven_-_Verse.mid",
         PROMPTS / "The_Four_Seasons_Concerto_No_4_Winter_-_Antonio_Vivaldi_-_Instrumental.mid")
PROMPT_BARS = 4
JAM_BPM, JAM_PHRASE, JAM_ANSWER_BARS = 100.0, (62, 65, 69, 67), 2
OVERHEAD_GOAL, JAM_GOAL_MS = 0.10, 300.0
HERE = CACHE / "studio"
TOKENIZER = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)  # as earlier figures: the demo's


def small_run() -> Path:
    """The `small` preset trained for one step on the test prompts (kept in .bench/studio/)."""
    from midigen.data.encode import encode_files
    from midigen.model import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.training.recipe import train

    run = HERE / "models" / "small"
    if not (run / "checkpoint.safetensors").exists():
        store = encode_files([PROMPTS], HERE / "store", TOKENIZER, workers=2, progress=False).store
        train(store, run, ModelConfig.preset("small", TOKENIZER),
              TrainConfig(max_steps=1, batch_size=2, eval_interval=1, warmup_steps=1, device="cpu"), progress=False)
    return run


class Server:
    """`midigen studio RUN` on a free port of the loopback, until closed."""

    def __init__(self, run: Path, takes: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "midigen", "studio", str(run), "--port", str(port),
                                         "--takes", str(takes), "--device", "cpu"], stdout=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.url, timeout=600)
        deadline = time.monotonic() + 300
        while True:
            assert self.process.poll() is None and time.monotonic() < deadline, "the studio did not start"
            try:
                if self.client.get("/api/health").json()["audio_prompts"] == "ready":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)


def streamed(server: Server, form: dict[str, str], prompt: tuple[str, bytes]) -> tuple[float | None, float, int]:
    """(seconds to the first note event or None, seconds to the end, new tokens) of a streamed generation."""
    start = time.perf_counter()
    first = None
    with server.client.stream("POST", "/api/generations/stream", data=form, files={"prompt": prompt}) as response:
        assert response.status_code == 200, response.read()
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                if kind == "note" and first is None:
                    first = time.perf_counter() - start
            elif line.startswith("data: ") and kind in ("done", "error"):
                data = json.loads(line[6:])
                assert kind == "done", data
                return first, time.perf_counter() - start, data["new_tokens"]
    raise AssertionError("the stream ended without its final event")


def phrase_file() -> bytes:
    """What the page sends when a jam phrase ends: the notes played, at the jam's tempo, as MIDI."""
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, JAM_BPM))
    track = symusic.Track("phrase", 0, False)
    for i, pitch in enumerate(JAM_PHRASE):
        track.notes.append(symusic.Note(i * 240, 200, pitch, 90))
    score.tracks.append(track)
    return score.dumps_midi()


def generation_rounds(server: Server, run: Path, bars: int, rounds: int, scratch: Path) -> dict[str, Any]:
    loaded = load_model(run, "cpu")
    tokenizer = load_tokenizer(loaded.tokenizer)
    prompt = load_prompt(PROMPT, PROMPT_BARS, tokenizer)
    upload = (PROMPT.name, PROMPT.read_bytes())
    jam_upload = ("phrase.mid", phrase_file())
    # in a worker thread, as the studio runs it: on a busy CPU, torch's two-thread ops were up to 30x slower on a
    # process's main thread than on another thread, which would flatter the server
    worker = ThreadPoolExecutor(max_workers=1)
    times: dict[str, list[float]] = {"in process": [], "server": [], "first note": [], "jam": []}
    tokens: list[int] = []

    def generate_command(seed: int) -> int:
        """What `midigen generate --prompt ... -o OUT.mid` does once its model is loaded."""
        generation = generate(loaded, load_prompt(PROMPT, PROMPT_BARS, tokenizer), SamplingConfig(seed=seed), bars=bars)
        write_generation(generation, tokenizer, scratch / "in-process.mid")
        return len(generation.sequence) - generation.prompt_length

    def in_process(seed: int) -> tuple[int, float]:
        start = time.perf_counter()
        new_tokens = worker.submit(generate_command, seed).result()
        return new_tokens, time.perf_counter() - start

    def through_server(seed: int) -> tuple[int, float]:
        start = time.perf_counter()
        response = server.client.post("/api/generations", files={"prompt": upload}, data={
            "model": run.name, "prompt_bars": str(PROMPT_BARS), "bars": str(bars), "seed": str(seed)})
        assert response.status_code == 200, response.text
        return response.json()["new_tokens"], time.perf_counter() - start

    in_process(0), through_server(0)  # warm-up of both
    for seed in range(1, rounds + 1):
        (new_tokens, local_s), (served_tokens, served_s) = in_process(seed), through_server(seed)
        assert served_tokens == new_tokens, "the server and generate disagree on the same seed"
        tokens.append(new_tokens)
        times["in process"].append(local_s)
        times["server"].append(served_s)
        first, _, _ = streamed(server, {"model": run.name, "prompt_bars": str(PROMPT_BARS), "bars": "2",
                                        "seed": str(seed)}, upload)
        if first is not None:
            times["first note"].append(first)
        jam, _, _ = streamed(server, {"model": run.name, "prompt_bars": "1", "bars": str(JAM_ANSWER_BARS),
                                      "seed": str(seed)}, jam_upload)
        if jam is not None:
            times["jam"].append(jam)
    overheads = [served / local - 1 for served, local in zip(times["server"], times["in process"])]
    return {"times": times, "tokens": tokens, "overhead": statistics.median(overheads), "prompt": len(prompt.sequence)}


def transcription_rounds(server: Server, rounds: int, scratch: Path) -> list[tuple[str, float, float]]:
    """(clip, seconds of audio, median seconds to transcribe it) for each clip, rendered by FluidSynth."""
    import soundfile

    rows = []
    for midi in CLIPS:
        wav = render_wav(midi, scratch / f"{midi.stem}.wav")
        seconds = soundfile.info(str(wav)).duration
        data = wav.read_bytes()
        spent = []
        for _ in range(rounds):
            start = time.perf_counter()
            response = server.client.post("/api/transcriptions", files={"audio": (wav.name, data)})
            spent.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
        rows.append((midi.name, seconds, statistics.median(spent)))
    return rows


def ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.0f} ms" if seconds else "no note"


def verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def section(bars: int, rounds: int) -> str:
    run = small_run()
    with tempfile.TemporaryDirectory(prefix="midigen-bench-studio-") as scratch:
        started = time.perf_counter()
        server = Server(run, Path(scratch) / "takes")
        ready_s = time.perf_counter() - started
        try:
            generation = generation_rounds(server, run, bars, rounds, Path(scratch))
            clips = transcription_rounds(server, rounds, Path(scratch))
        finally:
            server.close()
    times, tokens = generation["times"], generation["tokens"]
    rate = {name: statistics.median(t / s for t, s in zip(tokens, times[name])) for name in ("in process", "server")}
    overhead = generation["overhead"]
    jam_ms = 1000 * statistics.median(times["jam"]) if times["jam"] else float("inf")
    jam_worst = f"{1000 * max(times['jam']):.0f} ms" if times["jam"] else "no note"
    clip_rows = [f"| `{name}` | {seconds:.1f} s | {spent:.2f} s | {spent / seconds:.3f} |" for name, seconds, spent in clips]
    return (
        f"`midigen studio` in its own process on CPU ({cpu_name()}, {torch.get_num_threads()} torch threads), `small` "
        f"preset (trained one step: speed does not depend on the weights), asked over HTTP on the loopback; "
        f"{rounds} interleaved rounds, medians. The studio answered its first health check, with the transcriber "
        f"warmed up, {ready_s:.1f} s after it was started.\n\n"
        f"| measure | result | goal |\n|---|---|---|\n"
        f"| time to the first streamed note, continuing {PROMPT_BARS} bars of `{PROMPT.name}` (upload, parse, "
        f"prefill of {generation['prompt']} tokens, first note) | {ms(times['first note'])} | |\n"
        f"| tokens/s, `midigen generate`'s work in process ({bars} bars, {statistics.median(tokens):.0f} tokens) | "
        f"{rate['in process']:.0f} | |\n"
        f"| tokens/s through the server (the whole request; the same tokens) | {rate['server']:.0f} | |\n"
        f"| server overhead (median of the rounds' time ratios, minus 1) | {100 * overhead:+.1f}% | ≤ "
        f"{100 * OVERHEAD_GOAL:.0f}%: {verdict(overhead <= OVERHEAD_GOAL)} |\n"
        f"| the server's cost per request beside the generation (median of server minus in process) | "
        f"{1000 * statistics.median(s - p for s, p in zip(times['server'], times['in process'])):.0f} ms | |\n"
        f"| jam: phrase posted ({len(JAM_PHRASE)} notes, 1 bar at {JAM_BPM:.0f} bpm) to the answer's first note "
        f"(worst {jam_worst}) | {ms(times['jam'])} | ≤ {JAM_GOAL_MS:.0f} ms: {verdict(jam_ms <= JAM_GOAL_MS)} |\n\n"
        f"Transcription through the server (POST /api/transcriptions: upload, decoding, basic-pitch, writing the "
        f"take), FluidSynth renderings of real MIDI files:\n\n"
        "| clip | audio | time | seconds per second of audio |\n|---|---|---|---|\n" + "\n".join(clip_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (short generations, two rounds), writing to "
                             f".bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    args = parser.parse_args()
    bars, rounds = (8, 2) if args.quick else (32, 7)
    write_section("Studio: streaming, server overhead, jam latency, transcription", section(bars, rounds),
                  quick=args.quick)


if __name__ == "__main__":
    main()
