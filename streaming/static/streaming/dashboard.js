// The dashboard's pages (streaming/dashboard/): the live task list and a task's page.
//
// The list loads its first page of rows from tasks.json, then follows every
// model it shows over ONE multiplexed connection (watchFeed; one more for each
// model whose class name another app's shown model has, as events name their
// model by class name only): an event of a known row updates it in place; a
// task it does not know yet (one that just started) is fetched once from
// tasks.json and added at the top. Rows and models are keyed by app label and
// class name ("myapp/Report/7", as the feeds name them). The task page
// tails the task's stream from its first event (watchTask, history) and keeps
// its status, result and actions current. Reading, resuming and retrying are
// streaming.js's; this only draws. Everything a task sent is shown as text.
import {TERMINAL_TYPES, taskData, watchFeed, watchTask} from "./streaming.js";

const config = JSON.parse(document.getElementById("streaming-dashboard").textContent);
const TERMINAL = new Set(TERMINAL_TYPES);
const ENDED_STATUS = {complete: "completed", error: "failed", cancelled: "cancelled"};
const STATUS_LABEL = {
  created: "Not started", pending: "Pending", running: "Running",
  completed: "Completed", failed: "Failed", cancelled: "Cancelled",
};
const STATUS_RANK = {created: 0, pending: 1, running: 2, completed: 3, failed: 3, cancelled: 3};
// Several connections show as the least live of them.
const LIVE_RANK = {failed: 0, reconnecting: 1, connecting: 2, open: 3, ended: 4, closed: 5};
const MAX_EVENT_ROWS = 5000; // the task page drops its oldest rows beyond this
const MAX_LIST_ROWS = 200; // the list drops its oldest rows beyond this as new tasks arrive
const REFRESH_MS = 150; // rows to read again are gathered this long, then read in one request
const MAX_IDS = 50; // ids per tasks.json request (its page size)

// -- small helpers ---------------------------------------------------------------

function element(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, {dateStyle: "short", timeStyle: "medium"});
}

function timeElement(iso) {
  const node = element("time", iso ? {datetime: iso} : {}, formatTime(iso));
  if (iso) node.title = iso;
  return node;
}

function statusBadge(status, label) {
  return element("span", {class: `status status-${status}`}, label || STATUS_LABEL[status] || status);
}

/** A line that says what an event means: its message, its step, or its data. */
function summary(event) {
  if (!event) return "";
  const data = event.data;
  let text;
  if (data && typeof data === "object") {
    if (typeof data.message === "string") text = data.message;
    else if (data.step !== undefined && data.total_steps !== undefined) text = `Step ${data.step} of ${data.total_steps}`;
    else if (data.step !== undefined) text = `Step ${data.step}`;
    else text = JSON.stringify(taskData(data));
  } else {
    text = String(data);
  }
  return text.length > 140 ? `${text.slice(0, 139)}…` : text;
}

/** The share done, when an event says it (step and total_steps, or progress 0..1). */
function progress(event) {
  const data = event && event.data;
  if (!data || typeof data !== "object") return null;
  if (Number.isFinite(data.step) && Number.isFinite(data.total_steps) && data.total_steps > 0) {
    return Math.min(1, Math.max(0, data.step / data.total_steps));
  }
  if (Number.isFinite(data.progress) && data.progress >= 0 && data.progress <= 1) return data.progress;
  return null;
}

const live = document.querySelector("[data-live]");
function showConnection(state, detail) {
  if (!live) return;
  const texts = {
    connecting: "Connecting…", open: "Live", reconnecting: "Reconnecting…",
    ended: "Up to date", closed: "Stopped",
  };
  live.dataset.live = state;
  live.title = state === "failed" && detail ? detail.message : "";
  live.querySelector(".live-text").textContent = state === "failed" ? "No live updates" : texts[state] || state;
}

async function getJson(url) {
  const response = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin"});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

// -- the list --------------------------------------------------------------------

function listPage() {
  const table = document.getElementById("tasks");
  const body = table.tBodies[0];
  const state = document.getElementById("tasks-state");
  const rows = new Map(); // key ("<app_label>/<Model>/<id>") -> {data, tr}
  const {filters} = config;
  // Class names that models of two apps have.
  const classes = Object.keys(config.models).map((model) => model.slice(model.lastIndexOf("/") + 1));
  const shared = new Set(classes.filter((name, index) => classes.indexOf(name) !== index));

  // Changing a filter reloads the page with it (a plain GET form).
  for (const select of document.querySelectorAll(".filters select")) {
    select.addEventListener("change", () => select.form.submit());
  }

  const query = (extra = {}) => {
    const params = new URLSearchParams();
    if (filters.model) params.set("model", filters.model);
    if (filters.status) params.set("status", filters.status);
    for (const [name, value] of Object.entries(extra)) params.set(name, value);
    return `${config.rows}?${params}`;
  };

  const draw = (entry) => {
    const {data: row, tr} = entry;
    tr.replaceChildren();
    tr.dataset.key = row.key;
    tr.dataset.status = row.status;
    const name = element("td", {"data-label": "Task", class: "task-name"});
    const [app, model] = row.key.split("/");
    const link = element("a", {href: row.url}, `${model} ${row.id}`);
    // Two apps' models of one class name: say which app.
    name.append(link, element("small", {}, shared.has(model) ? `${row.model_name} (${app})` : row.model_name));
    const status = element("td", {"data-label": "Status"});
    status.append(statusBadge(row.status));
    const latest = element("td", {"data-label": "Latest event", class: "latest"});
    const inner = element("div");
    latest.append(inner);
    if (row.latest) {
      inner.append(element("span", {class: "event-type"}, row.latest.type), " ", element("span", {class: "event-text"}, summary(row.latest)));
      const share = progress(row.latest);
      if (share !== null && !TERMINAL.has(row.latest.type)) {
        const bar = element("span", {class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(Math.round(share * 100))});
        bar.append(element("span", {style: `width: ${(share * 100).toFixed(1)}%`}));
        inner.append(bar);
      }
    } else {
      inner.append(element("span", {class: "muted"}, "–"));
    }
    const cells = [
      name, status, latest,
      ["Created", row.created_at], ["Started", row.started_at], ["Finished", row.completed_at],
    ].map((cell) => {
      if (!Array.isArray(cell)) return cell;
      const td = element("td", {"data-label": cell[0], class: "time"});
      td.append(timeElement(cell[1]));
      return td;
    });
    cells.push(element("td", {"data-label": "Attempts", class: "num"}, String(row.attempts)));
    tr.append(...cells);
  };

  const flash = (tr) => {
    tr.classList.remove("flash");
    void tr.offsetWidth; // restart the animation
    tr.classList.add("flash");
  };

  const showState = () => {
    state.textContent = rows.size ? "" : "No tasks match.";
    state.hidden = rows.size > 0;
  };

  // Rows are newest first: a new one goes above the first older one.
  const place = (entry) => {
    const created = entry.data.created_at || "";
    for (const other of body.rows) {
      const known = rows.get(other.dataset.key);
      if (known && known !== entry && (known.data.created_at || "") < created) {
        body.insertBefore(entry.tr, other);
        return;
      }
    }
    body.append(entry.tr);
  };

  // A row read from tasks.json only adds to what the page knows: responses can
  // come back out of order, and live events run ahead of the batched event log,
  // so a status never goes back, and the newer latest event and any time known stay.
  const merge = (current, row) => {
    const merged = {...row};
    if ((STATUS_RANK[current.status] ?? 0) > (STATUS_RANK[row.status] ?? 0)) merged.status = current.status;
    if (current.latest && (!row.latest || current.latest.id > row.latest.id)) merged.latest = current.latest;
    for (const field of ["started_at", "completed_at"]) merged[field] = row[field] || current[field];
    merged.attempts = Math.max(row.attempts, current.attempts);
    return merged;
  };

  const upsert = (row, {fresh = false} = {}) => {
    let entry = rows.get(row.key);
    if (entry) {
      entry.data = merge(entry.data, row);
      draw(entry);
    } else {
      entry = {data: row, tr: element("tr")};
      rows.set(row.key, entry);
      draw(entry);
      place(entry);
      while (body.rows.length > MAX_LIST_ROWS) {
        const oldest = body.rows[body.rows.length - 1];
        rows.delete(oldest.dataset.key);
        oldest.remove();
      }
      showState();
    }
    if (fresh) flash(entry.tr);
    return entry;
  };

  // Rows to read again (tasks we do not know, or whose status changed), in one
  // request per model and kind every REFRESH_MS, however many tasks start at once.
  const queued = new Map(); // `${label}\n${known}` -> Set of ids
  let flushTimer = null;
  const refresh = (key, model, id) => {
    const known = rows.has(key);
    const slot = `${model}\n${known}`;
    if (!queued.has(slot)) queued.set(slot, new Set());
    queued.get(slot).add(String(id));
    flushTimer = flushTimer || setTimeout(flush, REFRESH_MS);
  };
  const flush = () => {
    flushTimer = null;
    const batches = [...queued];
    queued.clear();
    for (const [slot, ids] of batches) {
      const [model, known] = slot.split("\n");
      const all = [...ids];
      for (let start = 0; start < all.length; start += MAX_IDS) {
        const params = new URLSearchParams({model});
        for (const id of all.slice(start, start + MAX_IDS)) params.append("id", id);
        // A new row must match the filters; a known one is updated whatever its status now.
        if (known === "false" && filters.status) params.set("status", filters.status);
        getJson(`${config.rows}?${params}`).then(
          ({tasks}) => { for (const row of tasks) upsert(row, {fresh: known === "false"}); },
          (error) => console.warn(`streaming dashboard: could not read ${model} ${all}`, error),
        );
      }
    }
  };

  const onEvent = (event) => {
    if (event.key === null) return; // a notice of the server's
    // The task as its feed names it ("<app_label>/<Model>/<id>"): its row's key.
    const key = event.name;
    const label = config.models[key.slice(0, key.lastIndexOf("/"))];
    if (!label) return;
    const entry = rows.get(key);
    if (!entry) {
      if (filters.page === 1) refresh(key, label, event.taskId);
      return;
    }
    const row = entry.data;
    const latest = {id: event.id, type: event.type, data: event.data};
    if (!row.latest || row.latest.id < event.id) row.latest = latest;
    const status = TERMINAL.has(event.type) ? ENDED_STATUS[event.type] : "running";
    if (row.status !== status) {
      row.status = status; // at once; the times and attempts follow from the row
      refresh(key, label, event.taskId);
    }
    draw(entry);
    flash(entry.tr);
  };

  const pager = () => {
    const prev = document.querySelector(".pager [rel=prev]");
    const next = document.querySelector(".pager [rel=next]");
    const link = (page) => {
      const params = new URLSearchParams(location.search);
      params.set("page", page);
      return `?${params}`;
    };
    prev.hidden = filters.page <= 1;
    prev.href = link(filters.page - 1);
    return (hasNext) => {
      next.hidden = !hasNext;
      next.href = link(filters.page + 1);
    };
  };

  const start = async () => {
    const showNext = pager();
    try {
      const {tasks, has_next: hasNext} = await getJson(query({page: filters.page}));
      for (const row of tasks) upsert(row);
      showNext(hasNext);
      showState();
    } catch (error) {
      state.textContent = `Could not load tasks: ${error.message}`;
      return;
    }
    if (!config.feeds.length) {
      showConnection("closed");
      return;
    }
    // One connection for every model shown (the page's own session opens it),
    // but events name their model by class name only: a model whose class name
    // is already on a connection goes on the next one.
    const groups = [];
    for (const feed of config.feeds) {
      const model = feed.slice(feed.lastIndexOf("/") + 1);
      let group = groups.find((names) => !names.has(model));
      if (!group) groups.push(group = new Map());
      group.set(model, feed);
    }
    const states = groups.map(() => ["connecting", undefined]);
    const showAll = () => {
      // The least live connection is the page's state.
      const [state, detail] = states.reduce((a, b) => (LIVE_RANK[b[0]] ?? 0) < (LIVE_RANK[a[0]] ?? 0) ? b : a);
      showConnection(state, detail);
    };
    window.streamingFeeds = groups.map((group, index) => watchFeed([...group.values()], {
      onEvent,
      onState: (state, detail) => {
        states[index] = [state, detail];
        showAll();
      },
    }));
    window.streamingFeed = window.streamingFeeds[0];
  };
  start();
}

// -- a task's page ---------------------------------------------------------------

function taskPage() {
  const body = document.querySelector("#events tbody");
  const empty = document.getElementById("events-empty");
  const eventsTable = document.getElementById("events-table");
  const tail = document.getElementById("tail-state");
  const statusBadgeNode = document.getElementById("task-status");
  let status = config.status;

  const setStatus = (value, label) => {
    status = value;
    statusBadgeNode.className = `status status-${value}`;
    statusBadgeNode.textContent = label || STATUS_LABEL[value] || value;
    for (const form of document.querySelectorAll(".actions form[data-when]")) {
      form.hidden = !form.dataset.when.split(" ").includes(value);
    }
  };

  // The row from tasks.json: times, attempts, status, and the outcome.
  const update = async () => {
    let row;
    try {
      ({tasks: [row]} = await getJson(config.row));
    } catch (error) {
      console.warn("streaming dashboard: could not read the task", error);
      return;
    }
    if (!row) return;
    setStatus(row.status);
    for (const node of document.querySelectorAll("[data-field]")) {
      const value = row[node.dataset.field];
      if (node.tagName === "TIME") {
        node.setAttribute("datetime", value || "");
        node.title = value || "";
        node.textContent = formatTime(value);
      } else {
        node.textContent = String(value);
      }
    }
    const result = document.getElementById("task-result");
    const errorText = document.getElementById("task-error");
    const valueNode = document.getElementById("final-value");
    if (row.error) {
      document.getElementById("result-title").textContent = "Error";
      errorText.replaceChildren(element("strong", {}, row.error.type), `: ${row.error.message}`);
      errorText.hidden = false;
      result.hidden = false;
    } else if (row.status === "completed") {
      document.getElementById("result-title").textContent = "Final value";
      valueNode.textContent = JSON.stringify(row.final_value, null, 2);
      valueNode.hidden = false;
      result.hidden = false;
    }
  };

  const append = (event) => {
    empty.hidden = true;
    eventsTable.hidden = false;
    const tr = element("tr", {"data-seq": String(event.id)});
    const data = event.data && typeof event.data === "object" ? taskData(event.data) : event.data;
    const code = element("code", {}, typeof data === "string" ? data : JSON.stringify(data));
    const dataCell = element("td", {"data-label": "Data", class: "data"});
    dataCell.append(code);
    const type = element("td", {"data-label": "Event"});
    type.append(element("span", {class: `event-type event-${event.type}`}, event.type));
    const when = element("td", {"data-label": "Time", class: "time"});
    when.append(timeElement(event.data && event.data._timestamp));
    tr.append(element("td", {"data-label": "#", class: "num"}, String(event.id)), type, dataCell, when);
    body.append(tr);
    while (body.rows.length > MAX_EVENT_ROWS) body.deleteRow(0);
    tr.classList.add("flash");
  };

  const tailState = (state, detail) => {
    // A task that failed or was cancelled ended its stream as it should: "failed"
    // is the tail's own failure only when the server refused it.
    const ended = state === "failed" && detail.reason !== "http";
    showConnection(ended ? "ended" : state, detail);
    const texts = {
      connecting: "connecting…", open: "live", reconnecting: "reconnecting…",
      ended: "finished", closed: "stopped",
    };
    tail.textContent = ended ? texts.ended : state === "failed" ? `no live updates: ${detail.message}` : texts[state] || state;
    tail.dataset.state = ended ? "ended" : state;
  };

  window.streamingTail = watchTask(config.stream, {
    history: true,
    onEvent: (event) => {
      if (event.id === null) return; // a notice of the server's
      append(event);
      if (TERMINAL.has(event.type)) {
        setStatus(ENDED_STATUS[event.type]);
        update();
      } else if (status === "pending" || status === "created") {
        setStatus("running");
        update();
      }
    },
    onState: tailState,
  });
}

// Server-rendered times in the reader's own time zone.
for (const node of document.querySelectorAll("time[datetime]")) {
  if (node.getAttribute("datetime")) {
    node.title = node.getAttribute("datetime");
    node.textContent = formatTime(node.getAttribute("datetime"));
  }
}
if (document.getElementById("tasks")) listPage();
else if (document.getElementById("events")) taskPage();
