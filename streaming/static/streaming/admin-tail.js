// The live tail of a task's event log, on its admin change page (StreamTaskAdmin).
//
// The server renders the last events into <table class="streaming-events"
// data-stream="/stream/<Model>/<id>" data-last-seq="<n>">; this follows the
// stream from there (?last_event_id=<n>, or ?history=all when nothing was
// rendered) and appends a row per event until the terminal one. The request
// carries the page's session cookie (same origin): the stream answers when the
// user may watch the task.
//
// fetch() and not EventSource: an EventSource hands over only the event types
// it was given listeners for, and a task's types are its own. So this reads
// the Server-Sent Events itself, and resumes after its last event when the
// connection drops, as an EventSource would.
//
// Event data is shown as text (textContent), never parsed as HTML.
"use strict";

(() => {
  const TERMINAL = new Set(["complete", "error", "cancelled"]);
  const MAX_ROWS = 2000; // older rows are dropped from the top beyond this
  const RETRY_MS = 2000; // until the server says otherwise (retry:)
  const MAX_RETRY_MS = 30000;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function follow(table) {
    const path = table.dataset.stream;
    const body = table.tBodies[0] || table.createTBody();
    const status = table.parentElement.querySelector(".streaming-tail-status");
    let last = table.dataset.lastSeq === "" || table.dataset.lastSeq === undefined
      ? null
      : Number(table.dataset.lastSeq);
    let retryMs = RETRY_MS;
    let failures = 0;

    const say = (text) => {
      if (status) status.textContent = text;
      table.dataset.tail = text;
    };

    const append = (seq, type, data) => {
      const empty = body.querySelector("tr.streaming-empty");
      if (empty) empty.remove();
      const row = document.createElement("tr");
      row.className = "streaming-live";
      const cells = [String(seq), type, data];
      cells.forEach((text, index) => {
        const cell = document.createElement("td");
        if (index === 2) {
          const code = document.createElement("code");
          code.textContent = text;
          cell.appendChild(code);
        } else {
          cell.textContent = text;
        }
        row.appendChild(cell);
      });
      body.appendChild(row);
      while (body.rows.length > MAX_ROWS) body.deleteRow(0);
    };

    // One SSE message: true when it was the task's terminal event.
    const dispatch = (message) => {
      if (message.data === null) return false;
      if (message.id === null) {
        // A notice of the server's (no id: not one of the task's events).
        say(`Live: ${message.type} ${message.data}`);
        return false;
      }
      const seq = Number(message.id);
      if (last !== null && seq <= last) return false; // seen already
      last = seq;
      append(seq, message.type, message.data);
      return TERMINAL.has(message.type);
    };

    // Read one response to its end: true when the terminal event came.
    const read = async (response) => {
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let message = {type: "message", data: null, id: null};
      for (;;) {
        const {value, done} = await reader.read();
        if (done) return false;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line === "") {
            if (dispatch(message)) {
              reader.cancel().catch(() => {});
              return true;
            }
            message = {type: "message", data: null, id: null};
            continue;
          }
          if (line.startsWith(":")) continue; // a comment: keep-alive
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") message.type = value;
          else if (field === "data") message.data = message.data === null ? value : `${message.data}\n${value}`;
          else if (field === "id") message.id = value;
          else if (field === "retry" && /^\d+$/.test(value)) retryMs = Number(value);
        }
      }
    };

    const run = async () => {
      for (;;) {
        const url = last === null ? `${path}?history=all` : `${path}?last_event_id=${last}`;
        let response = null;
        try {
          response = await fetch(url, {
            headers: {Accept: "text/event-stream"},
            credentials: "same-origin",
            cache: "no-store",
          });
        } catch (error) {
          response = null; // the network: try again
        }
        if (response !== null && response.status === 204) {
          say("Finished: the task's last event is shown.");
          return;
        }
        if (response !== null && response.ok) {
          say("Live: new events appear as they come.");
          failures = 0;
          try {
            if (await read(response)) {
              say("Finished: the task's last event is shown.");
              return;
            }
          } catch (error) {
            // the connection dropped mid-stream: resume after the last event
          }
        } else if (response !== null && response.status !== 503 && response.status < 500) {
          // 401, 403, 404...: waiting will not change it.
          const text = (await response.text()).trim();
          say(`No live updates: the stream answered ${response.status} ${text}`);
          return;
        }
        failures += 1;
        say("Reconnecting...");
        await sleep(Math.min(retryMs * failures, MAX_RETRY_MS));
      }
    };

    run();
  }

  function start() {
    for (const table of document.querySelectorAll("table.streaming-events[data-stream]")) {
      follow(table);
    }
    for (const origin of document.querySelectorAll(".streaming-origin")) {
      origin.textContent = window.location.origin;
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
