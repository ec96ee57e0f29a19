// The studio page: choose a model, give a prompt, generate (notes stream into the piano roll), listen,
// download, keep takes, and jam.

import { getJSON, postForm, streamGeneration } from "./api.js";
import { Jam } from "./jam.js";
import { Keyboard } from "./keyboard.js";
import { midiFile } from "./midifile.js";
import { Recorder } from "./recorder.js";
import { PianoRoll } from "./roll.js";
import { Synth } from "./synth.js";

const $ = (id) => document.getElementById(id);
const STEPS_PER_QUARTER = 8;  // the grid the page draws played notes on
const RELEASE_S = 0.3;

const synth = new Synth();
const roll = new PianoRoll($("roll"));
const recorder = new Recorder();
const state = {
  models: [],
  takes: [],
  shown: null,  // the take in the piano roll
  continuing: null,  // the take to continue, when the prompt is "a take"
  heard: null,  // the transcription of the last recording
  phrase: [],  // what was played on a keyboard: {pitch, start, duration, velocity}, audio-clock seconds
  held: new Map(),  // pitch -> {voice, note}
  generating: null,  // the AbortController of the generation being streamed
  playback: null,  // {take, start, end} on the audio clock
};

// ---- messages --------------------------------------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// ---- models ----------------------------------------------------------------------------------------------
function figure(value, digits = 3) {
  if (value === null || value === undefined) return "not recorded";
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(digits) : value.toLocaleString("en");
}

function showCard(card) {
  const rows = card.error ? [["error", card.error]] : [
    ["kind", card.kind === "run" ? "training run" : "model folder"],
    ["size", `${figure(card.parameters)} parameters: ${card.layers} layers × width ${card.width}, context ${card.context}, memory ${card.memory}`],
    ["learned from", `${figure(card.store.songs)} songs, ${figure(card.store.tokens)} tokens (${card.store.path ?? "store not recorded"})`],
    ["training", `${figure(card.training_steps)} steps, ${figure(card.tokens_seen)} tokens seen, ${figure(card.training_minutes, 1)} min`],
    ["validation NLL", `${figure(card.val_nll)} (best ${figure(card.best_val_nll)}) nats/token`],
  ];
  $("card").replaceChildren(...rows.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    return [dt, dd];
  }));
  $("loss-plot").hidden = !card.loss_plot;
  if (card.loss_plot) $("loss-plot").src = card.loss_plot;
}

async function loadModels() {
  const { models } = await getJSON("/api/models");
  state.models = models;
  $("model").replaceChildren(...models.map((card) => new Option(card.name, card.name)));
  if (models.length) showCard(models[0]);
}

async function loadHealth() {
  const health = await getJSON("/api/health");
  $("health").textContent = `${health.models} model(s) · audio prompts: ${health.audio_prompts} · WAV: ${health.wav.split(":")[0]}`;
  if (health.audio_prompts === "warming up") setTimeout(() => loadHealth().catch(() => {}), 3000);
  return health;
}

// ---- what the player plays -------------------------------------------------------------------------------
const jam = new Jam(synth, jamSettings, (event) => {
  if (event.kind === "status") $("jam-status").textContent = event.text;
  else if (event.kind === "error") showError(event.text);
  else if (event.kind === "note") showJam();
});

function noteOn(pitch, velocity) {
  const voice = synth.noteOn(pitch, velocity);  // first: the player hears the note now
  const note = { pitch, start: synth.now, duration: 0, velocity };
  state.held.set(pitch, { voice, note });
  if (jam.on) jam.noteOn(pitch, velocity);
  else state.phrase.push(note);
}

function noteOff(pitch) {
  const held = state.held.get(pitch);
  if (!held) return;
  state.held.delete(pitch);
  synth.noteOff(held.voice);
  held.note.duration = Math.max(0.05, synth.now - held.note.start);
  if (jam.on) {
    jam.noteOff(pitch);
    return;
  }
  selectSource("keyboard");
  showPhrase();
}

function secondsPerStep() {
  return 60 / (Number($("tempo").value) * STEPS_PER_QUARTER);
}

function asSteps(notes, origin, role) {
  const step = secondsPerStep();
  return notes.map((note) => ({ pitch: note.pitch, step: Math.round((note.start - origin) / step),
    length: Math.max(1, Math.round(note.duration / step)), role: note.role || role }));
}

function barSteps(endStep) {
  const bar = 4 * STEPS_PER_QUARTER;
  return Array.from({ length: Math.max(1, Math.ceil(endStep / bar)) + 1 }, (_, i) => i * bar);
}

function showPhrase() {
  const played = state.phrase.filter((note) => note.duration > 0);
  $("phrase-info").textContent = played.length ? `${played.length} notes played` : "";
  if (!played.length) return;
  const notes = asSteps(played, played[0].start, "user");
  roll.show(notes, barSteps(Math.max(...notes.map((n) => n.step + n.length))), null);
  state.shown = null;
  updateRollInfo();
}

function showJam() {
  const notes = jam.session.filter((note) => note.duration > 0);
  if (!notes.length) return;
  const origin = Math.min(...notes.map((note) => note.start));
  const steps = asSteps(notes.map((note) => ({ ...note, role: note.who === "user" ? "user" : "model" })), origin);
  roll.show(steps, barSteps(Math.max(...steps.map((n) => n.step + n.length))), null);
  $("jam-save").disabled = false;
  updateRollInfo();
}

function phraseForm(form) {
  const played = state.phrase.filter((note) => note.duration > 0);
  if (!played.length) throw new Error("play something on a keyboard first (or choose another prompt)");
  const bpm = Number($("tempo").value);
  const origin = played[0].start;
  const notes = played.map((note) => ({ ...note, start: note.start - origin }));
  const end = Math.max(...notes.map((note) => note.start + note.duration));
  form.append("prompt", new Blob([midiFile([{ name: "keyboard", program: 0, notes }], bpm)], { type: "audio/midi" }), "keyboard.mid");
  form.append("prompt_bars", String(Math.min(64, Math.max(1, Math.ceil(end / (240 / bpm) - 1e-6)))));
}

function jamSettings() {
  return {
    model: $("model").value, silenceMs: Number($("jam-silence").value), answerBars: Number($("jam-bars").value),
    bpm: Number($("tempo").value), temperature: Number($("temperature").value), topP: Number($("top-p").value),
    program: Number($("instrument").value), seed: $("seed").value,
  };
}

// ---- prompt ----------------------------------------------------------------------------------------------
function source() {
  return document.querySelector("input[name=source]:checked").value;
}

function selectSource(value) {
  const radio = document.querySelector(`input[name=source][value=${value}]`);
  radio.disabled = false;
  radio.checked = true;
  for (const panel of document.querySelectorAll(".source-panel")) panel.classList.toggle("shown", panel.dataset.source === value);
}

function isAudio(file) {
  return file.type.startsWith("audio/") && !file.type.includes("midi") || /\.(wav|mp3|flac|ogg)$/i.test(file.name);
}

async function transcribe(blob, name) {
  const form = new FormData();
  form.append("audio", blob, name);
  setStatus(`transcribing ${name}…`);
  const take = await postForm("/api/transcriptions", form);
  state.heard = take;
  $("record-info").textContent = `heard ${take.notes.length} notes in ${name}`;
  showTake(take);
  addTake(take);
  setStatus(`heard ${take.notes.length} notes`);
  return take;
}

function promptForm(form) {
  const kind = source();
  const file = $("prompt-file").files[0];
  if (kind === "file") {
    if (!file) throw new Error("choose a MIDI or audio file first");
    form.append("prompt", file, file.name);
  } else if (kind === "keyboard") phraseForm(form);
  else if (kind === "audio") {
    if (!state.heard) throw new Error("record a tune first");
    form.append("take", state.heard.id);
  } else if (kind === "take") form.append("take", state.continuing.id);
  if (!form.has("prompt_bars")) form.append("prompt_bars", $("prompt-bars").value);
}

// ---- generating ------------------------------------------------------------------------------------------
function generationForm() {
  const form = new FormData();
  form.append("model", $("model").value);
  form.append("bars", $("bars").value);
  form.append("temperature", $("temperature").value);
  form.append("top_p", $("top-p").value);
  if ($("seed").value !== "") form.append("seed", $("seed").value);
  form.append("instruments", $("instrument").value);
  promptForm(form);
  return form;
}

function setGenerating(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
}

async function generate() {
  showError("");
  let form;
  try {
    form = generationForm();
  } catch (error) {
    showError(error.message);
    return;
  }
  stopPlayback();
  const controller = (state.generating = new AbortController());
  setGenerating(true);
  setStatus("sending…");
  const started = performance.now();
  let firstNote = null;
  try {
    for await (const event of streamGeneration(form, controller.signal)) {
      const data = event.data;
      if (event.kind === "queued") setStatus(data.ahead ? `queued: ${data.ahead} ahead` : "generating…");
      else if (event.kind === "start") {
        roll.show(data.prompt_notes.map((note) => ({ ...note, role: "prompt" })), data.bar_steps, data.continuation_step);
        state.shown = null;
        setStatus("generating…");
      } else if (event.kind === "note") {
        firstNote ??= performance.now() - started;
        roll.add({ ...data, role: "model" });
        setStatus(`generating… ${roll.count("model")} new notes so far`);
      } else if (event.kind === "error") throw new Error(data.error);
      else if (event.kind === "cancelled") setStatus("stopped");
      else if (event.kind === "done") {
        addTake(data);
        showTake(data);
        setStatus(`done: ${data.notes.filter((n) => !n.prompt).length} new notes` +
          (firstNote === null ? "" : ` (first after ${Math.round(firstNote)} ms)`) +
          (data.time_limited ? "; stopped at the studio's time limit" : ""));
      }
      updateRollInfo();
    }
  } catch (error) {
    if (error.name === "AbortError") setStatus("stopped");
    else {
      showError(error.message);
      setStatus("failed");
    }
  } finally {
    state.generating = null;
    setGenerating(false);
  }
}

function updateRollInfo() {
  const parts = [["prompt", "prompt"], ["model", "new"], ["user", "played"]]
    .map(([role, label]) => [label, roll.count(role)]).filter(([, count]) => count > 0);
  $("roll-info").textContent = parts.map(([label, count]) => `${label}: ${count} notes`).join(" · ");
}

// ---- takes -----------------------------------------------------------------------------------------------
function showTake(take) {
  state.shown = take;
  const notes = take.notes.map((note) => ({ ...note, role: note.prompt ? "prompt" : take.kind === "transcription" ? "user" : "model" }));
  const end = Math.max(...take.notes.map((note) => note.step + note.length));
  roll.show(notes, take.bar_steps || barSteps(end), take.continuation_step || null);
  $("play").disabled = false;
  $("downloads").hidden = false;
  for (const kind of ["mid", "wav", "png"]) $(`download-${kind}`).href = take[kind];
  for (const item of $("takes").children) item.classList.toggle("current", item.dataset.id === take.id);
  updateRollInfo();
}

function button(text, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", action);
  return element;
}

function addTake(take) {
  if (state.takes.some((known) => known.id === take.id)) return;
  state.takes.push(take);
  const item = document.createElement("li");
  item.dataset.id = take.id;
  const title = document.createElement("div");
  const fresh = take.notes.filter((note) => !note.prompt).length;
  title.textContent = take.kind === "transcription" ? `${take.title}: ${take.notes.length} notes`
    : `${take.model}, seed ${take.seed}: ${fresh} new notes`;
  const actions = document.createElement("div");
  actions.className = "take-actions";
  const links = ["mid", "wav"].map((kind) => {
    const link = document.createElement("a");
    link.href = take[kind];
    link.download = "";
    link.textContent = kind === "mid" ? "MIDI" : "WAV";
    return link;
  });
  actions.append(
    button("Play", () => { showTake(take); play(take); }),
    button("Show", () => showTake(take)),
    button("Continue", () => {
      state.continuing = take;
      $("take-info").textContent = `continuing ${take.title}`;
      const end = Math.max(...take.notes.map((note) => note.step + note.length));
      const bars = take.bar_steps ? take.bar_steps.filter((step) => step < end).length : Math.ceil(end / (4 * STEPS_PER_QUARTER));
      $("prompt-bars").value = String(Math.min(64, Math.max(1, bars)));
      selectSource("take");
    }),
    ...links,
  );
  item.append(title, actions);
  $("takes").prepend(item);
}

// ---- playback --------------------------------------------------------------------------------------------
function play(take) {
  const context = synth.start();
  stopPlayback();
  const start = context.currentTime + 0.1;
  const perStep = take.seconds_per_step;
  for (const note of take.notes) synth.schedule(note.pitch, start + note.step * perStep, note.length * perStep, note.prompt ? 0.5 : 0.7);
  const end = Math.max(...take.notes.map((note) => note.step + note.length)) * perStep;
  state.playback = { take, start, end: start + end + RELEASE_S };
  $("stop-playback").disabled = false;
  setStatus(`playing ${take.title}`);
}

function stopPlayback() {
  synth.stopAll();
  if (state.playback) setStatus("ready");
  state.playback = null;
  roll.setPlayhead(null);
  $("stop-playback").disabled = true;
}

function clock(seconds) {
  const whole = Math.max(0, seconds);
  return `${Math.floor(whole / 60)}:${(whole % 60).toFixed(1).padStart(4, "0")}`;
}

function frame() {
  $("audio-state").textContent = synth.state;
  $("level").value = Math.min(1, synth.level() * 4);
  const playback = state.playback;
  if (playback) {
    const elapsed = synth.now - playback.start;
    if (synth.now > playback.end) stopPlayback();
    else {
      $("clock").textContent = clock(elapsed);
      if (state.shown === playback.take) roll.setPlayhead(elapsed / playback.take.seconds_per_step);
    }
  }
  requestAnimationFrame(frame);
}

// ---- wiring ----------------------------------------------------------------------------------------------
function download(bytes, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type: "audio/midi" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function wire() {
  $("model").addEventListener("change", () => showCard(state.models.find((card) => card.name === $("model").value)));
  for (const radio of document.querySelectorAll("input[name=source]")) radio.addEventListener("change", () => selectSource(radio.value));
  $("prompt-file").addEventListener("change", async () => {
    const file = $("prompt-file").files[0];
    if (!file) return;
    selectSource("file");
    showError("");
    if (!isAudio(file)) return;
    try {
      await transcribe(file, file.name);
      selectSource("audio");
    } catch (error) {
      showError(error.message);
      setStatus("failed");
    }
  });
  $("clear-phrase").addEventListener("click", () => {
    state.phrase = [];
    showPhrase();
    roll.clear();
    updateRollInfo();
  });
  $("record").addEventListener("click", async () => {
    showError("");
    try {
      if (!recorder.recording) {
        synth.start();
        await recorder.start();
        $("record").textContent = "Stop recording";
        $("record-info").textContent = "recording…";
        return;
      }
      $("record").textContent = "Record";
      const { wav, seconds } = await recorder.stop(synth.start());
      $("record-info").textContent = `recorded ${seconds.toFixed(1)} s`;
      await transcribe(new Blob([wav], { type: "audio/wav" }), "recording.wav");
    } catch (error) {
      showError(error.message);
      setStatus("failed");
    }
  });
  $("generate").addEventListener("click", () => {
    synth.start();
    generate();
  });
  $("stop").addEventListener("click", () => state.generating?.abort());
  $("play").addEventListener("click", () => state.shown && play(state.shown));
  $("stop-playback").addEventListener("click", stopPlayback);
  $("jam-toggle").addEventListener("click", () => {
    const on = !jam.on;
    if (on) jam.start();
    else jam.stop();
    $("jam-toggle").setAttribute("aria-pressed", String(on));
    $("jam-toggle").textContent = on ? "Stop jamming" : "Start jamming";
  });
  $("jam-save").addEventListener("click", () => download(jam.sessionFile(Number($("tempo").value), Number($("instrument").value)), "midigen-jam.mid"));
}

async function main() {
  wire();
  const keyboard = new Keyboard($("keyboard"), noteOn, noteOff);
  keyboard.connectMidi((text) => { $("midi-status").textContent = text; });
  requestAnimationFrame(frame);
  try {
    await loadModels();
    await loadHealth();
    setStatus("ready");
  } catch (error) {
    showError(`cannot reach the studio: ${error.message}`);
  }
}

main();
