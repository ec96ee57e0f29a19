// Standard MIDI files written in the browser (what was played on a keyboard, and a jam session), so that a
// played phrase reaches the server the way a file does.

const PPQ = 480;

function variableLength(value) {
  const bytes = [value & 0x7f];
  for (value >>= 7; value > 0; value >>= 7) bytes.unshift((value & 0x7f) | 0x80);
  return bytes;
}

function chunk(type, body) {
  const length = body.length;
  return [...type].map((c) => c.charCodeAt(0))
    .concat([(length >>> 24) & 0xff, (length >>> 16) & 0xff, (length >>> 8) & 0xff, length & 0xff], body);
}

function trackBody(events) {
  events.sort((a, b) => a.tick - b.tick || a.order - b.order);
  const body = [];
  let last = 0;
  for (const event of events) {
    body.push(...variableLength(event.tick - last), ...event.bytes);
    last = event.tick;
  }
  body.push(0, 0xff, 0x2f, 0x00);
  return body;
}

// `tracks`: [{name, program, notes: [{pitch, start, duration, velocity}]}], start and duration in seconds at
// `bpm` quarter notes per minute (4/4). Returns the file's bytes (format 1: a tempo track, then one per track).
export function midiFile(tracks, bpm) {
  const tick = (seconds) => Math.max(0, Math.round((seconds * bpm / 60) * PPQ));
  const microseconds = Math.round(60_000_000 / bpm);
  const tempo = trackBody([
    { tick: 0, order: 0, bytes: [0xff, 0x51, 0x03, (microseconds >> 16) & 0xff, (microseconds >> 8) & 0xff, microseconds & 0xff] },
    { tick: 0, order: 1, bytes: [0xff, 0x58, 0x04, 4, 2, 24, 8] },
  ]);
  const bodies = tracks.map((track, index) => {
    const channel = index % 16 === 9 ? 10 : index % 16;  // never the drum channel
    const name = [...new TextEncoder().encode(track.name)].slice(0, 100);
    const events = [
      { tick: 0, order: 0, bytes: [0xff, 0x03, ...variableLength(name.length), ...name] },
      { tick: 0, order: 1, bytes: [0xc0 | channel, track.program & 0x7f] },
    ];
    for (const note of track.notes) {
      const on = tick(note.start);
      const off = Math.max(on + 1, tick(note.start + note.duration));
      const velocity = Math.max(1, Math.min(127, Math.round((note.velocity ?? 0.8) * 127)));
      events.push({ tick: on, order: 3, bytes: [0x90 | channel, note.pitch, velocity] });
      events.push({ tick: off, order: 2, bytes: [0x80 | channel, note.pitch, 0] });
    }
    return trackBody(events);
  });
  const header = chunk("MThd", [0, 1, 0, bodies.length + 1, (PPQ >> 8) & 0xff, PPQ & 0xff]);
  return new Uint8Array([...header, ...chunk("MTrk", tempo), ...bodies.flatMap((body) => chunk("MTrk", body))]);
}
