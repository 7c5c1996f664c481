// The live tail of a task's event log, on its admin change page (StreamTaskAdmin).
//
// The server renders the last events into <table class="streaming-events"
// data-stream="/stream/<Model>/<id>" data-last-seq="<n>">; this follows the
// stream from there (after event <n>, or from the first event when nothing was
// rendered) and appends a row per event until the terminal one. The request
// carries the page's session cookie (same origin): the stream answers when the
// user may watch the task. Reading, resuming and retrying are streaming.js's
// (the library's JavaScript client); this only draws.
//
// Event data is shown as text (textContent), never parsed as HTML.
import {watchTask} from "./streaming.js";

const MAX_ROWS = 2000; // older rows are dropped from the top beyond this

function follow(table) {
  const body = table.tBodies[0] || table.createTBody();
  const status = table.parentElement.querySelector(".streaming-tail-status");
  const lastSeq = table.dataset.lastSeq;
  const after = lastSeq === "" || lastSeq === undefined ? null : Number(lastSeq);

  const say = (text) => {
    if (status) status.textContent = text;
    table.dataset.tail = text;
  };

  const append = (event, raw) => {
    const empty = body.querySelector("tr.streaming-empty");
    if (empty) empty.remove();
    const row = document.createElement("tr");
    row.className = "streaming-live";
    [String(event.id), event.type, raw].forEach((text, index) => {
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

  watchTask(table.dataset.stream, {
    history: after === null,
    after,
    onEvent: (event) => {
      if (event.id === null) say(`Live: ${event.type} ${event.raw}`); // a notice of the server's
      else append(event, event.raw);
    },
    onState: (state, detail) => {
      if (state === "open") say("Live: new events appear as they come.");
      else if (state === "reconnecting") say("Reconnecting...");
      else if (state === "ended") say("Finished: the task's last event is shown.");
      else if (state === "failed" && detail.reason === "http") say(`No live updates: the stream answered ${detail.message}`);
      else if (state === "failed") say("Finished: the task's last event is shown.");
    },
  });
}

for (const table of document.querySelectorAll("table.streaming-events[data-stream]")) {
  follow(table);
}
for (const origin of document.querySelectorAll(".streaming-origin")) {
  origin.textContent = window.location.origin;
}
