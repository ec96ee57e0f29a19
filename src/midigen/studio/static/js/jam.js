// Call and response: the player plays a phrase; after a silence the model answers it with a few bars in the
// same tempo, scheduled on the audio clock; the player answers back. The player's notes sound at once (the
// page plays them before anything else happens) and the whole session saves as one MIDI file.

import { streamGeneration } from "./api.js";
import { midiFile } from "./midifile.js";

export class Jam {
  // `settings()` gives {model, silenceMs, answerBars, bpm, temperature, topP, program, seed ("": random)}; `show(event)` tells
  // the page what happens: {kind: "note", note} | {kind: "status", text} | {kind: "error", text}.
  constructor(synth, settings, show) {
    this.synth = synth;
    this.settings = settings;
    this.show = show;
    this.on = false;
    this.session = [];  // {pitch, start, duration, velocity, who}, times on the audio clock
    this.phrase = [];
    this.sounding = new Map();  // pitch -> the note being held
    this.timer = null;
    this.answering = null;  // the AbortController of the answer being streamed
  }

  start() {
    this.on = true;
    this.session = [];
    this.phrase = [];
    this.synth.start();
    this.show({ kind: "status", text: "listening: play a phrase" });
  }

  stop() {
    this.on = false;
    clearTimeout(this.timer);
    this.answering?.abort();
    this.show({ kind: "status", text: "stopped" });
  }

  noteOn(pitch, velocity) {
    if (!this.on) return;
    clearTimeout(this.timer);
    const note = { pitch, start: this.synth.now, duration: 0, velocity, who: "user" };
    this.sounding.set(pitch, note);
    this.phrase.push(note);
    this.session.push(note);
  }

  noteOff(pitch) {
    if (!this.on) return;
    const note = this.sounding.get(pitch);
    if (!note) return;
    this.sounding.delete(pitch);
    note.duration = Math.max(0.05, this.synth.now - note.start);
    this.show({ kind: "note", note });
    if (this.sounding.size === 0) {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.answer(), this.settings().silenceMs);
    }
  }

  // The phrase as a MIDI file whose first note starts bar 1, and how many bars it fills.
  phraseFile(bpm) {
    const origin = this.phrase[0].start;
    const notes = this.phrase.map((note) => ({ ...note, start: note.start - origin }));
    const end = Math.max(...notes.map((note) => note.start + note.duration));
    const barSeconds = (4 * 60) / bpm;
    return { bytes: midiFile([{ name: "phrase", program: 0, notes }], bpm), bars: Math.max(1, Math.ceil(end / barSeconds - 1e-6)), origin };
  }

  async answer() {
    if (!this.on || this.phrase.length === 0) return;
    const settings = this.settings();
    const { bytes, bars, origin } = this.phraseFile(settings.bpm);
    this.phrase = [];
    const asked = performance.now();
    const form = new FormData();
    form.append("model", settings.model);
    form.append("prompt", new Blob([bytes], { type: "audio/midi" }), "phrase.mid");
    form.append("prompt_bars", String(Math.min(64, bars)));
    form.append("bars", String(settings.answerBars));
    form.append("temperature", String(settings.temperature));
    form.append("top_p", String(settings.topP));
    form.append("instruments", String(settings.program));
    if (settings.seed !== "") form.append("seed", settings.seed);  // a fixed seed answers a phrase the same way
    this.answering?.abort();
    const controller = (this.answering = new AbortController());
    this.show({ kind: "status", text: "the model is answering…" });
    let secondsPerStep = 0;
    let stepsPerQuarter = 0;
    let shift = null;
    let answered = 0;
    try {
      for await (const event of streamGeneration(form, controller.signal)) {
        if (event.kind === "start") ({ seconds_per_step: secondsPerStep, steps_per_quarter: stepsPerQuarter } = event.data);
        else if (event.kind === "note") {
          const when = origin + event.data.step * secondsPerStep;
          if (shift === null) {
            // the answer keeps the phrase's beat: if its first note's time has passed, it moves on by whole beats
            const beat = secondsPerStep * stepsPerQuarter;
            const late = this.synth.now + 0.03 - when;
            shift = late > 0 ? Math.ceil(late / beat) * beat : 0;
            this.show({ kind: "status", text: `answering: first note ${Math.round(performance.now() - asked)} ms after the silence` });
          }
          const note = { pitch: event.data.pitch, start: when + shift, duration: event.data.length * secondsPerStep,
            velocity: 0.7, who: "model" };
          this.synth.schedule(note.pitch, note.start, note.duration, note.velocity);
          this.session.push(note);
          this.show({ kind: "note", note });
          answered += 1;
        } else if (event.kind === "error") throw new Error(event.data.error);
        else if (event.kind === "done") this.show({ kind: "status", text: `answered with ${answered} notes: your turn` });
      }
    } catch (error) {
      if (error.name !== "AbortError") this.show({ kind: "error", text: error.message });
    }
  }

  // The session (the player's notes and the model's answers) as one MIDI file, from its first note.
  sessionFile(bpm, program) {
    const origin = Math.min(...this.session.map((note) => note.start));
    const track = (who, name, trackProgram) => ({
      name, program: trackProgram,
      notes: this.session.filter((note) => note.who === who && note.duration > 0).map((note) => ({ ...note, start: note.start - origin })),
    });
    return midiFile([track("user", "you", 0), track("model", "midigen", program)], bpm);
  }
}
