// The browser's synthesizer: a small polyphonic WebAudio instrument (two detuned oscillators through a
// low-pass filter, with an envelope), a master gain and an analyser whose level the page shows.
// Notes are scheduled on the AudioContext's clock, which never drifts against the sound.

const ATTACK_S = 0.008;
const RELEASE_S = 0.12;

export function frequency(pitch) {
  return 440 * 2 ** ((pitch - 69) / 12);
}

export class Synth {
  constructor() {
    this.context = null;
    this.scheduled = new Set();  // voices of played-back notes, to stop them all at once
  }

  // The AudioContext, created (and resumed) on the first call: call it from a user's gesture.
  start() {
    if (!this.context) {
      this.context = new AudioContext({ latencyHint: "interactive" });
      this.master = this.context.createGain();
      this.master.gain.value = 0.18;
      this.analyser = this.context.createAnalyser();
      this.analyser.fftSize = 1024;
      this.master.connect(this.analyser);
      this.analyser.connect(this.context.destination);
      this.samples = new Float32Array(this.analyser.fftSize);
    }
    if (this.context.state === "suspended") this.context.resume();
    return this.context;
  }

  get now() {
    return this.context ? this.context.currentTime : 0;
  }

  get state() {
    return this.context ? this.context.state : "off";
  }

  voice(pitch, start, velocity) {
    const context = this.context;
    const filter = context.createBiquadFilter();
    filter.type = "lowpass";
    filter.frequency.value = Math.min(12000, frequency(pitch) * 6);
    const gain = context.createGain();
    gain.gain.setValueAtTime(0, start);
    gain.gain.linearRampToValueAtTime(velocity, start + ATTACK_S);
    gain.gain.setTargetAtTime(velocity * 0.55, start + ATTACK_S, 0.25);
    filter.connect(gain);
    gain.connect(this.master);
    const oscillators = [["triangle", 0], ["sawtooth", 7]].map(([type, cents]) => {
      const oscillator = context.createOscillator();
      oscillator.type = type;
      oscillator.frequency.value = frequency(pitch);
      oscillator.detune.value = cents;
      oscillator.connect(filter);
      oscillator.start(start);
      return oscillator;
    });
    return { gain, oscillators, filter };
  }

  release(voice, at) {
    const when = Math.max(at, this.now);
    voice.gain.gain.cancelScheduledValues(when);
    voice.gain.gain.setTargetAtTime(0, when, RELEASE_S / 4);
    for (const oscillator of voice.oscillators) oscillator.stop(when + RELEASE_S);
    voice.oscillators[0].onended = () => voice.gain.disconnect();
  }

  // A note at `start` seconds on the audio clock, for `duration` seconds.
  schedule(pitch, start, duration, velocity = 0.7) {
    const voice = this.voice(pitch, Math.max(start, this.now), velocity);
    this.release(voice, start + duration);
    this.scheduled.add(voice);
    voice.oscillators[0].addEventListener("ended", () => this.scheduled.delete(voice));
    return voice;
  }

  // A note that sounds now, until `noteOff`: what a key press plays, with no waiting on anything.
  noteOn(pitch, velocity = 0.8) {
    this.start();
    return this.voice(pitch, this.now, velocity);
  }

  noteOff(voice) {
    this.release(voice, this.now);
  }

  stopAll() {
    for (const voice of this.scheduled) this.release(voice, this.now);
    this.scheduled.clear();
  }

  // The output's level now: the RMS of the analyser's last frame (0 when silent).
  level() {
    if (!this.context) return 0;
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const sample of this.samples) sum += sample * sample;
    return Math.sqrt(sum / this.samples.length);
  }
}
