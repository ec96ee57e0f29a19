// Playing notes in: the on-screen keyboard, the computer's keys, and MIDI keyboards (Web MIDI). Each calls
// `onNoteOn(pitch, velocity)` and `onNoteOff(pitch)`; the page sounds the note at once.

const LOWEST = 48;  // C3
const HIGHEST = 84;  // C6
const BLACK = [1, 3, 6, 8, 10];
const COMPUTER_KEYS = "awsedftgyhujk";  // C4 up to C5, as on a piano's keys
const COMPUTER_BASE = 60;
const NAMES = ["C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B"];

export function pitchName(pitch) {
  return `${NAMES[pitch % 12]}${Math.floor(pitch / 12) - 1}`;
}

export class Keyboard {
  constructor(element, onNoteOn, onNoteOff) {
    this.element = element;
    this.onNoteOn = onNoteOn;
    this.onNoteOff = onNoteOff;
    this.held = new Set();
    this.keys = new Map();
    this.build();
    this.listenToComputerKeys();
  }

  build() {
    const whites = [];
    for (let pitch = LOWEST; pitch <= HIGHEST; pitch++) if (!BLACK.includes(pitch % 12)) whites.push(pitch);
    const whiteWidth = 100 / whites.length;
    for (let pitch = LOWEST; pitch <= HIGHEST; pitch++) {
      const key = document.createElement("div");
      const black = BLACK.includes(pitch % 12);
      key.className = `key ${black ? "black" : "white"}`;
      key.dataset.pitch = String(pitch);
      key.setAttribute("role", "button");
      key.setAttribute("aria-label", pitchName(pitch));
      const whitesBefore = whites.filter((p) => p < pitch).length;
      key.style.left = `${(black ? whitesBefore - 0.32 : whitesBefore) * whiteWidth}%`;
      key.style.width = `${(black ? 0.64 : 1) * whiteWidth}%`;
      if (pitch % 12 === 0) {
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = pitchName(pitch);
        key.append(label);
      }
      key.addEventListener("pointerdown", (event) => {
        event.preventDefault();
        key.setPointerCapture(event.pointerId);
        this.press(pitch, 0.8);
      });
      for (const type of ["pointerup", "pointercancel"]) key.addEventListener(type, () => this.release(pitch));
      this.keys.set(pitch, key);
      this.element.append(key);
    }
  }

  listenToComputerKeys() {
    const pitchOf = (event) => {
      const target = event.target;
      if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return null;
      if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement) return null;
      const index = COMPUTER_KEYS.indexOf(event.key.toLowerCase());
      return index < 0 ? null : COMPUTER_BASE + index;
    };
    window.addEventListener("keydown", (event) => {
      const pitch = pitchOf(event);
      if (pitch !== null) this.press(pitch, 0.8);
    });
    window.addEventListener("keyup", (event) => {
      const index = COMPUTER_KEYS.indexOf(event.key.toLowerCase());
      if (index >= 0) this.release(COMPUTER_BASE + index);
    });
  }

  press(pitch, velocity) {
    if (this.held.has(pitch)) return;
    this.held.add(pitch);
    this.keys.get(pitch)?.classList.add("down");
    this.onNoteOn(pitch, velocity);
  }

  release(pitch) {
    if (!this.held.delete(pitch)) return;
    this.keys.get(pitch)?.classList.remove("down");
    this.onNoteOff(pitch);
  }

  // MIDI keyboards through Web MIDI, where the browser has it; `report(text)` says what is connected.
  async connectMidi(report) {
    if (!navigator.requestMIDIAccess) {
      report("(this browser has no Web MIDI)");
      return;
    }
    let access;
    try {
      access = await navigator.requestMIDIAccess();
    } catch (error) {
      report(`(MIDI keyboards: ${error.message || "not allowed"})`);
      return;
    }
    const attach = () => {
      const names = [];
      for (const input of access.inputs.values()) {
        input.onmidimessage = (message) => this.midiMessage(message.data);
        names.push(input.name || "MIDI input");
      }
      report(names.length ? `MIDI: ${names.join(", ")}` : "(no MIDI keyboard connected)");
    };
    access.onstatechange = attach;
    attach();
  }

  midiMessage(data) {
    const [status, pitch, velocity] = data;
    const kind = status & 0xf0;
    if (kind === 0x90 && velocity > 0) this.press(pitch, velocity / 127);
    else if (kind === 0x80 || (kind === 0x90 && velocity === 0)) this.release(pitch);
  }
}
