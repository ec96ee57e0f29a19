// Recording a clip from the microphone, handed to the server as a WAV file (browsers record compressed
// audio the transcriber's decoder may not read; the page decodes it and writes plain PCM).

const SAMPLE_RATE = 22050;  // what basic-pitch works at

export function wavFile(samples, sampleRate) {
  const bytes = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, value) => [...value].forEach((c, i) => bytes.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  bytes.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  bytes.setUint32(16, 16, true);
  bytes.setUint16(20, 1, true);  // PCM
  bytes.setUint16(22, 1, true);  // mono
  bytes.setUint32(24, sampleRate, true);
  bytes.setUint32(28, sampleRate * 2, true);
  bytes.setUint16(32, 2, true);
  bytes.setUint16(34, 16, true);
  text(36, "data");
  bytes.setUint32(40, samples.length * 2, true);
  samples.forEach((sample, i) => bytes.setInt16(44 + i * 2, Math.max(-1, Math.min(1, sample)) * 0x7fff, true));
  return new Uint8Array(bytes.buffer);
}

export class Recorder {
  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    this.chunks = [];
    this.recorder = new MediaRecorder(this.stream);
    this.recorder.ondataavailable = (event) => this.chunks.push(event.data);
    this.stopped = new Promise((resolve) => { this.recorder.onstop = resolve; });
    this.recorder.start();
  }

  get recording() {
    return Boolean(this.recorder && this.recorder.state === "recording");
  }

  // Stops, and returns the clip as a mono WAV (bytes) at 22,050 Hz, and its length in seconds.
  async stop(context) {
    this.recorder.stop();
    await this.stopped;
    for (const track of this.stream.getTracks()) track.stop();
    const encoded = await new Blob(this.chunks).arrayBuffer();
    const decoded = await context.decodeAudioData(encoded);
    const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * SAMPLE_RATE)), SAMPLE_RATE);
    const source = offline.createBufferSource();
    source.buffer = decoded;
    source.connect(offline.destination);
    source.start();
    const mono = await offline.startRendering();
    return { wav: wavFile(mono.getChannelData(0), SAMPLE_RATE), seconds: decoded.duration };
  }
}
