// The studio's HTTP API, as the page uses it: JSON requests, and generations streamed as server-sent events
// over a POST (the form carries the prompt file, which EventSource cannot send).

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  return new Error(body.error || `${response.status} ${response.statusText}`);
}

export async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postForm(url, form) {
  const response = await fetch(url, { method: "POST", body: form });
  if (!response.ok) throw await failure(response);
  return response.json();
}

function parseEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return { kind, data: data.length ? JSON.parse(data.join("\n")) : {} };
}

// Yields {kind, data} for each event of a streamed generation; aborting `signal` closes the stream, which
// cancels the generation on the server.
export async function* streamGeneration(form, signal) {
  const response = await fetch("/api/generations/stream", { method: "POST", body: form, signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (block.trim()) yield parseEvent(block);
    }
  }
}
