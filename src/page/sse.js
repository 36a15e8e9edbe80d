// Server-sent events read with fetch (EventSource cannot send an Authorization header).
import { authHeaders, parseJson } from "./api.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** Splits an SSE byte stream into events; calls `onEvent({event, id, data})` for each. */
export function parser(onEvent) {
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  return (chunk) => {
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) onEvent({ event: event.event, id: event.id, data: event.data.join("\n") });
        event = { event: "message", data: [], id: event.id };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "event") event.event = value;
        else if (name === "data") event.data.push(value);
        else if (name === "id") event.id = value;
      }
    }
  };
}

/** Follows one job's events until a terminal one (reconnecting with Last-Event-ID); `onEvent(json)`. */
export async function follow(jobId, onEvent, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 20 && !signal?.aborted; attempt++) {
    let ended = false;
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal });
      if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const feed = parser(({ id, data }) => {
        if (id) lastId = id;
        let message;
        try {
          message = parseJson(data);
        } catch {
          return;
        }
        onEvent(message);
        if (TERMINAL.has(message.type)) ended = true;
      });
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          feed(value);
          if (ended) break;
        }
      } finally {
        // Free the connection at once: a browser holds only six per server, and a stream left open takes one.
        reader.cancel().catch(() => {});
      }
      if (ended) return;
    } catch (error) {
      if (signal?.aborted) return;
      if (attempt >= 19) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}
