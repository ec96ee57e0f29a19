// The piano roll: notes on a canvas (time across, pitch up), bar lines, a line where the continuation
// starts, and a playhead. Notes are {pitch, step, length, role} with role "prompt", "model" or "user".

const COLOURS = { prompt: "#5b7db1", model: "#c0502a", user: "#2f8f5b" };
const MIN_PITCH_SPAN = 24;

export class PianoRoll {
  constructor(canvas) {
    this.canvas = canvas;
    this.clear();
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  clear() {
    this.notes = [];
    this.barSteps = [0, 32];
    this.continuationStep = null;
    this.playhead = null;
    this.draw();
  }

  // A new picture: `notes`, the bars' start steps (the last one is the end), where the continuation starts.
  show(notes, barSteps, continuationStep) {
    this.notes = notes.slice();
    this.barSteps = barSteps.length > 1 ? barSteps.slice() : [0, 32];
    this.continuationStep = continuationStep;
    this.draw();
  }

  add(note) {
    this.notes.push(note);
    this.draw();
  }

  count(role) {
    return this.notes.filter((note) => note.role === role).length;
  }

  setPlayhead(step) {
    this.playhead = step;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, width, height);
    const lastNoteEnd = Math.max(0, ...this.notes.map((note) => note.step + note.length));
    const endStep = Math.max(this.barSteps[this.barSteps.length - 1], lastNoteEnd, 1);
    const pitches = this.notes.map((note) => note.pitch);
    let low = pitches.length ? Math.min(...pitches) - 2 : 48;
    let high = pitches.length ? Math.max(...pitches) + 2 : 72;
    if (high - low < MIN_PITCH_SPAN) {
      const missing = MIN_PITCH_SPAN - (high - low);
      low -= Math.floor(missing / 2);
      high += Math.ceil(missing / 2);
    }
    const x = (step) => (step / endStep) * width;
    const rowHeight = height / (high - low + 1);
    const y = (pitch) => (high - pitch) * rowHeight;

    g.fillStyle = "#f1f3f7";  // the black keys' rows
    for (let pitch = low; pitch <= high; pitch++) {
      if ([1, 3, 6, 8, 10].includes(((pitch % 12) + 12) % 12)) g.fillRect(0, y(pitch), width, rowHeight);
    }
    g.strokeStyle = "#c9cfda";
    g.lineWidth = ratio;
    for (const step of this.barSteps) {
      g.beginPath();
      g.moveTo(x(step) + 0.5, 0);
      g.lineTo(x(step) + 0.5, height);
      g.stroke();
    }
    if (this.continuationStep !== null && this.continuationStep > 0) {
      g.strokeStyle = "#b22222";
      g.lineWidth = 2 * ratio;
      g.beginPath();
      g.moveTo(x(this.continuationStep), 0);
      g.lineTo(x(this.continuationStep), height);
      g.stroke();
    }
    for (const note of this.notes) {
      g.fillStyle = COLOURS[note.role] || COLOURS.model;
      g.fillRect(x(note.step), y(note.pitch) + 1, Math.max(2 * ratio, x(note.length) - 1), Math.max(2, rowHeight - 2));
    }
    if (this.playhead !== null) {
      g.strokeStyle = "#1d2330";
      g.lineWidth = 2 * ratio;
      g.beginPath();
      g.moveTo(x(this.playhead), 0);
      g.lineTo(x(this.playhead), height);
      g.stroke();
    }
  }
}
