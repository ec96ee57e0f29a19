"""The studio's page in a real browser (Debian's Chromium driven by Playwright; never a downloaded one):
upload a prompt and watch notes stream into the piano roll, hear it, download it, stop a generation, bad
uploads, the on-screen keyboard, a (faked) MIDI keyboard jamming with the model, a (fake) microphone recorded
into a transcription; no console errors on any page. Screenshots of the main states go to
out/studio/screenshots/.

Where Chromium is missing these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import symusic
from test_studio import MELODY, PROMPT, crash_or_hang_on, parsers_forked_with, serving, slowed_generation, write_melody

from midigen.studio.service import Studio

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "out" / "studio" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
MISSING_RESOURCE = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")
# A MIDI keyboard for the page: navigator.requestMIDIAccess answers with one input, which the test plays
# through window.fakeKeyboard.send([status, pitch, velocity]).
FAKE_MIDI = """
(() => {
  const input = { id: "fake-1", name: "Fake keyboard", manufacturer: "midigen tests", state: "connected",
                  type: "input", onmidimessage: null };
  window.fakeKeyboard = { send: (data) => input.onmidimessage && input.onmidimessage({ data: new Uint8Array(data) }) };
  navigator.requestMIDIAccess = async () => ({ inputs: new Map([[input.id, input]]), outputs: new Map(),
                                               onstatechange: null, sysexEnabled: false });
})();
"""

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the test extra brings it
    sync_playwright = None


def launch(playwright: Any, extra_args: tuple[str, ...] = ()) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args])


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if sync_playwright is None or not CHROMIUM.exists():
        missing = "playwright is not installed" if sync_playwright is None else f"{CHROMIUM} is missing"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: CI runs the browser tests (`make setup` installs chromium with apt)")
        pytest.skip(f"{missing} (`make setup` installs it)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Browser]:
    browser = launch(playwright)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def studio(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    studio = Studio([tiny_run], tmp_path_factory.mktemp("takes"), queue_capacity=2, device="cpu")
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def url(studio: Studio) -> Iterator[str]:
    with serving(studio) as base:
        yield base


class Console:
    """A page's console errors and uncaught exceptions; the expected failed requests of a test aside."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def assert_clean(self, refused_requests: int = 0) -> None:
        refused = [e for e in self.errors if MISSING_RESOURCE.match(e)]
        assert [e for e in self.errors if not MISSING_RESOURCE.match(e)] == []
        assert len(refused) == refused_requests, refused


@pytest.fixture()
def page(browser: Browser, url: str) -> Iterator[tuple[Page, Console]]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=url, accept_downloads=True)
    context.add_init_script(FAKE_MIDI)
    page = context.new_page()
    console = Console(page)
    page.goto("/")
    expect(page.locator("#status")).to_have_text("ready")
    yield page, console
    context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def note_count(page: Page, label: str) -> int:
    found = re.search(rf"{label}: (\d+) notes", page.locator("#roll-info").inner_text())
    return int(found.group(1)) if found else 0


def take_of(url: str, page: Page) -> dict[str, Any]:
    take_id = page.locator("#takes li").first.get_attribute("data-id")
    return httpx.get(f"{url}/api/generations/{take_id}").json()


def test_upload_watch_the_notes_stream_hear_and_download(page: tuple[Page, Console], url: str,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    page, console = page
    expect(page.locator("#card")).to_contain_text("parameters")
    slowed_generation(monkeypatch, seconds_per_token=0.3)  # long enough to watch the notes come in
    page.set_input_files("#prompt-file", str(PROMPT))
    page.fill("#prompt-bars", "2")
    page.fill("#bars", "4")
    page.fill("#seed", "5")
    page.click("#generate")
    expect(page.locator("#roll-info")).to_contain_text("new:", timeout=60_000)
    expect(page.locator("#stop")).to_be_enabled()  # still streaming when the first notes are drawn
    assert page.locator("#status").inner_text().startswith("generating")
    screenshot(page, "streaming")
    expect(page.locator("#status")).to_have_text(re.compile(r"^done: \d+ new notes"), timeout=120_000)
    take = take_of(url, page)
    new_notes = sum(not note["prompt"] for note in take["notes"])
    assert note_count(page, "new") == new_notes > 0
    assert note_count(page, "prompt") == len(take["notes"]) - new_notes > 0
    screenshot(page, "take")

    page.click("#play")
    expect(page.locator("#audio-state")).to_have_text("running")
    expect(page.locator("#status")).to_have_text(re.compile("^playing"))
    levels, clocks = [], []
    for _ in range(8):
        time.sleep(0.15)
        levels.append(page.eval_on_selector("#level", "meter => meter.value"))
        clocks.append(page.locator("#clock").inner_text())
    assert max(levels) > 0.0, levels  # sound is coming out of the analyser
    seconds = [int(c.split(":")[0]) * 60 + float(c.split(":")[1]) for c in clocks]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0], clocks  # the audio clock advances
    screenshot(page, "playing")

    with page.expect_download() as download:
        page.click("#download-mid")
    saved = tmp_path / "take.mid"
    download.value.save_as(saved)
    score = symusic.Score(str(saved))
    assert sum(track.note_num() for track in score.tracks) == len(take["notes"])
    assert saved.read_bytes() == httpx.get(url + take["mid"]).content
    console.assert_clean()


def test_stop_cancels_the_generation(page: tuple[Page, Console], url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    page, console = page
    slowed_generation(monkeypatch, seconds_per_token=0.2)
    cancelled = httpx.get(f"{url}/api/health").json()["queue"]["cancelled"]
    page.fill("#bars", "64")
    page.click("#generate")
    expect(page.locator("#roll-info")).to_contain_text("new:", timeout=60_000)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator("#generate")).to_be_enabled()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/api/health").json()["queue"]["cancelled"] != cancelled + 1:
        assert time.monotonic() < deadline, "the server went on generating after Stop"
        time.sleep(0.1)
    assert page.locator("#takes li").count() == 0
    console.assert_clean()


def test_bad_uploads_show_an_error_and_the_server_lives(page: tuple[Page, Console], url: str, studio: Studio,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page, console = page
    text = tmp_path / "letter.mid"
    text.write_text("Dear studio, this is not music.\n")
    page.set_input_files("#prompt-file", str(text))
    page.click("#generate")
    expect(page.locator("#error")).to_have_text("prompt letter.mid: neither a MIDI file nor audio (WAV, FLAC, MP3 or OGG)")
    expect(page.locator("#error")).to_be_visible()
    screenshot(page, "bad-upload")

    poisoned = tmp_path / "poisoned.mid"
    poisoned.write_bytes(PROMPT.read_bytes() + b"poison")
    with parsers_forked_with(studio, crash_or_hang_on("poison", "crash"), monkeypatch):
        page.set_input_files("#prompt-file", str(poisoned))
        page.click("#generate")
        expect(page.locator("#error")).to_have_text("prompt poisoned.mid: parser crashed: SIGSEGV")

    broken_audio = tmp_path / "broken.wav"
    broken_audio.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x05" * 200)
    page.set_input_files("#prompt-file", str(broken_audio))  # audio goes to the transcriber first
    expect(page.locator("#error")).to_contain_text("broken.wav: not audio that can be read", timeout=120_000)

    assert httpx.get(f"{url}/api/health").json()["status"] == "ok"
    page.set_input_files("#prompt-file", str(PROMPT))
    page.fill("#bars", "1")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile("^done"), timeout=120_000)
    expect(page.locator("#error")).to_be_hidden()
    console.assert_clean(refused_requests=3)


def test_the_on_screen_keyboard_plays_a_prompt(page: tuple[Page, Console], url: str) -> None:
    page, console = page
    played = (60, 64, 67, 72)
    for pitch in played:
        page.locator(f"#keyboard [data-pitch='{pitch}']").hover()
        page.mouse.down()
        time.sleep(0.15)
        page.mouse.up()
    expect(page.locator("#phrase-info")).to_have_text(f"{len(played)} notes played")
    assert page.locator("input[name=source][value=keyboard]").is_checked()
    page.fill("#bars", "2")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile("^done"), timeout=120_000)
    take = take_of(url, page)
    assert [note["pitch"] for note in take["notes"] if note["prompt"]] == list(played)
    assert take["tempo_qpm"] == pytest.approx(100, abs=0.01)  # the page's tempo reached the server in the file
    console.assert_clean()


def test_jamming_with_a_midi_keyboard(page: tuple[Page, Console], url: str, tmp_path: Path) -> None:
    page, console = page
    expect(page.locator("#midi-status")).to_have_text("MIDI: Fake keyboard")
    requests: list[str] = []
    page.on("request", lambda request: "/api/generations" in request.url and requests.append(request.url))
    page.fill("#jam-bars", "2")
    page.fill("#seed", "1")  # the tiny model's answer to a phrase with a random seed may hold no note
    page.click("#jam-toggle")
    expect(page.locator("#audio-state")).to_have_text("running")
    phrase = (62, 65, 69, 67)
    for pitch in phrase:
        page.evaluate("data => window.fakeKeyboard.send(data)", [0x90, pitch, 100])
        time.sleep(0.12)
        # the player's note sounds at once: the level is up while the server has heard nothing
        assert float(page.eval_on_selector("#level", "m => m.value")) > 0
        assert requests == []
        page.evaluate("data => window.fakeKeyboard.send(data)", [0x80, pitch, 0])
        time.sleep(0.08)
    # about 600 ms of silence later the phrase goes to the model, which answers
    expect(page.locator("#jam-status")).to_have_text(re.compile(r"^answered with \d+ notes"), timeout=120_000)
    assert len(requests) == 1
    answered = int(re.search(r"answered with (\d+) notes", page.locator("#jam-status").inner_text()).group(1))
    assert answered > 0
    assert note_count(page, "played") == len(phrase)
    assert note_count(page, "new") == answered
    screenshot(page, "jam")
    with page.expect_download() as download:
        page.click("#jam-save")
    saved = tmp_path / "jam.mid"
    download.value.save_as(saved)
    score = symusic.Score(str(saved))
    tracks = {track.name: track for track in score.tracks}
    assert [note.pitch for note in tracks["you"].notes] == list(phrase)
    assert tracks["midigen"].note_num() == answered
    first_answer = min(note.time for note in tracks["midigen"].notes)
    assert first_answer >= max(note.time for note in tracks["you"].notes)  # the answer comes after the call
    console.assert_clean()


def test_a_recording_from_the_microphone_is_transcribed(playwright: Any, url: str, tmp_path: Path) -> None:
    clip = write_melody(tmp_path / "hummed.wav", MELODY, note_s=0.5)
    browser = launch(playwright, (f"--use-file-for-fake-audio-capture={clip}",))  # the fake microphone plays it
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=url)
        page = context.new_page()
        console = Console(page)
        page.goto("/")
        expect(page.locator("#status")).to_have_text("ready")
        page.check("input[name=source][value=audio]")
        page.click("#record")
        expect(page.locator("#record-info")).to_have_text("recording…")
        time.sleep(len(MELODY) * 0.5 + 1.0)
        page.click("#record")
        expect(page.locator("#record-info")).to_have_text(re.compile(r"^heard \d+ notes in recording\.wav"),
                                                          timeout=120_000)
        take = take_of(url, page)
        assert take["kind"] == "transcription"
        heard = [note["pitch"] for note in take["notes"]]
        # the tune comes through the browser's compressed recording: every pitch of it is heard, and few others
        assert set(MELODY) <= set(heard) and sum(pitch in MELODY for pitch in heard) >= 0.8 * len(heard), heard
        screenshot(page, "recorded")
        page.fill("#bars", "1")
        page.click("#generate")
        expect(page.locator("#status")).to_have_text(re.compile("^done"), timeout=120_000)
        generated = take_of(url, page)
        assert [note["pitch"] for note in generated["notes"] if note["prompt"]] == heard  # 4 bars hold the clip
        console.assert_clean()
    finally:
        browser.close()
