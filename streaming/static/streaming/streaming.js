// streaming.js: watch tasks of django-streaming-coordinator from a browser.
//
//   import {watchTask} from "/static/streaming/streaming.js";
//   const watch = watchTask({model: "Report", id: 7}, {
//     on: {progress: (data) => console.log(data.step)},
//   });
//   const value = await watch.result;  // what process() returned; rejects on error/cancelled
//
// watchTask() follows one task's stream (/stream/<Model>/<id>); watchTasks()
// and watchFeed() follow many tasks over one connection (the multiplexed
// stream, /stream/?task=...&feed=...). Both read the Server-Sent Events with
// fetch() rather than EventSource, which can send no Authorization header and
// hands over only the event types it was given listeners for. They resume
// after a dropped connection or a server restart where they stopped (per task:
// Last-Event-ID, or task=<Model>/<id>@<cursor> on the multiplexed stream),
// waiting as the server's retry: asks, so no event is lost or repeated; they
// stop for good on 400, 401, 403, 404 and 405, whose messages they report.
//
// Plain ES module, no dependencies, no build step.

export const TERMINAL_TYPES = Object.freeze(["complete", "error", "cancelled"]);
const TERMINAL = new Set(TERMINAL_TYPES);
const RUNNER_KEYS = ["_task_id", "_model", "_timestamp"];
const DEFAULT_RETRY_MS = 1000; // until the server says otherwise (retry:)
const MAX_RETRY_MS = 30000;
const MAX_RETRY_AFTER_MS = 60000;
const MAX_MUX_TASKS = 100; // the multiplexed stream takes at most this many task=

/** Why a watch ended without a final value. `reason`: "error" (the task failed;
 * `type` is the exception's type), "cancelled", "access_expired" (the token ran
 * out and no `token` function gave a new one), "http" (`status`: the server
 * refused the request), "closed" (close() was called). */
export class StreamError extends Error {
  constructor(message, {reason, status = null, type = null, data = null} = {}) {
    super(message);
    this.name = "StreamError";
    this.reason = reason;
    this.status = status;
    this.type = type;
    this.data = data;
  }
}

/** The path of a task's stream: a string is used as given; {model, id, app?}
 * gives /stream/[<app>/]<model>/<id>. */
export function streamPath(target) {
  if (typeof target === "string") return target;
  if (!target || !target.model || target.id === undefined || target.id === null) {
    throw new TypeError('A task is a URL or {model: "Report", id: 7} (app: "myapp" if the name is ambiguous)');
  }
  return namePath(taskName(target));
}

// The stream path of a task named as the multiplexed stream names it.
function namePath(name) {
  return `/stream/${name.split("/").map(encodeURIComponent).join("/")}`;
}

/** A task as the multiplexed stream names it: [<app>/]<model>/<id>. */
export function taskName(target) {
  if (typeof target === "string") {
    const name = target.replace(/^.*\/stream\//, "").replace(/\/$/, "");
    if (!/^([^/@?&]+\/)?[^/@?&]+\/[^/@?&]+$/.test(name)) {
      throw new TypeError(`Not a task: ${target} (expected "Model/id", "app/Model/id" or a stream path)`);
    }
    return name;
  }
  const model = target.app ? `${target.app}/${target.model}` : target.model;
  return `${model}/${target.id}`;
}

/** The key the events of a task carry: "<Model>/<id>" from their _model and _task_id. */
export function taskKey(name) {
  const parts = name.split("/");
  return parts.slice(-2).join("/");
}

// The model part of a task's name ("myapp/Report" of "myapp/Report/7"), and a
// model's class name ("Report" of "myapp/Report").
function modelOf(name) {
  return name.slice(0, name.lastIndexOf("/"));
}

function classOf(model) {
  return model.slice(model.lastIndexOf("/") + 1);
}

// Two names of one class name in one watch must be one model: the events cannot
// tell "a/Report" from "b/Report" (a bare "Report" is one model or a 404).
function sameModel(a, b) {
  if (a !== b && a.includes("/") && b.includes("/") && classOf(a) === classOf(b)) {
    throw new TypeError(
      `${a} and ${b} share the class name ${classOf(a)}, the only name their events carry (_model): ` +
      "one connection cannot tell their tasks apart: watch each on a connection of its own",
    );
  }
}

/** An event's data without the keys the runner adds (_task_id, _model, _timestamp). */
export function taskData(data) {
  if (data === null || typeof data !== "object") return data;
  const value = {...data};
  for (const key of RUNNER_KEYS) delete value[key];
  return value;
}

/** What process() returned, from its complete event's data: {known, value}. The
 * runner sends a returned dict as it is, anything else x as {result: x} and None
 * as {}; so {} and a lone "result" key leave it open (the task may have returned
 * them itself), and then the JSON status decides (known: false; value: the guess). */
function completeValue(data) {
  const fields = taskData(data);
  if (fields === null || typeof fields !== "object") return {known: false, value: fields};
  const keys = Object.keys(fields);
  if (keys.length === 0) return {known: false, value: null};
  if (keys.length === 1 && keys[0] === "result") return {known: false, value: fields.result};
  return {known: true, value: fields};
}

// -- reading Server-Sent Events ------------------------------------------------

/** The messages of an SSE body (a ReadableStream of bytes), as they arrive:
 * {type, data, id} per event (data: the text, null for none; id: null when the
 * message has none), and {retry: ms} for a retry: line. Comments are skipped. */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = {type: "message", data: null, id: null};
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let start = 0;
      let newline;
      while ((newline = buffer.indexOf("\n", start)) >= 0) {
        let line = buffer.slice(start, newline);
        start = newline + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (message.data !== null) yield message;
          message = {type: "message", data: null, id: null};
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") message.type = text;
        else if (field === "data") message.data = message.data === null ? text : `${message.data}\n${text}`;
        else if (field === "id") message.id = text;
        else if (field === "retry" && /^\d+$/.test(text)) yield {retry: Number(text)};
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseData(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
  });
}

function retryAfterMs(response) {
  const seconds = Number(response.headers.get("retry-after"));
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds * 1000, MAX_RETRY_AFTER_MS) : 0;
}

// A promise with its resolve/reject at hand. Marked as handled: a page may rely
// on callbacks alone, and an unawaited rejection is then no error of its.
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {});
  return {promise, resolve, reject, settled: false};
}

function settle(slot, error, value) {
  if (slot.settled) return;
  slot.settled = true;
  if (error) slot.reject(error);
  else slot.resolve(value);
}

function call(callback, ...args) {
  if (typeof callback !== "function") return;
  try {
    callback(...args);
  } catch (error) {
    console.error("streaming.js: a callback threw", error); // the stream goes on
  }
}

// The outcome of a task's error or cancelled event: [error, undefined].
function failure(type, data) {
  const message = (data && typeof data === "object" && data.message) || (type === "cancelled" ? "Task cancelled" : "Task failed");
  return [new StreamError(message, {reason: type, type: data && data.type, data}), undefined];
}

function statusOutcome(status) {
  const types = {completed: "complete", failed: "error", cancelled: "cancelled"};
  const type = types[status.status];
  if (!type) return [new StreamError(`The task is ${status.status}`, {reason: "http", data: status}), undefined];
  if (type === "complete") return [null, status.final_value === undefined ? null : status.final_value];
  return failure(type, status.error || {});
}

// A task's JSON status (GET its stream path with Accept: application/json).
async function readStatus(fetchImpl, url, token, credentials) {
  const headers = authHeaders(await resolveToken(token), "application/json");
  const response = await fetchImpl(url, {headers, credentials, cache: "no-store"});
  if (!response.ok) {
    const text = (await response.text().catch(() => "")).trim();
    throw new StreamError(`${response.status} ${text}`, {reason: "http", status: response.status});
  }
  return response.json();
}

// [error, value] of a task that ended: from its terminal event, asking its JSON
// status only when the complete event leaves the value open.
async function settleEnd(type, data, status) {
  if (type !== "complete") return failure(type, data);
  const {known, value} = completeValue(data);
  if (known) return [null, value];
  try {
    return statusOutcome(await status());
  } catch {
    return [null, value]; // the status cannot be read: the event's best reading
  }
}

/** The loop both watchers share: connect, read, and on a drop reconnect after
 * the server's retry: (backing off while it keeps failing), until a handler says
 * the watch is over. Handlers: request() -> {url, headers}; message(m) -> true
 * when done, "reconnect" to reconnect now; noContent() (a 204); ended() (the
 * response ended by itself) -> true when done; fail(error). */
async function follow({fetchImpl, credentials, signal, request, message, noContent, ended, fail, state}) {
  let retryMs = DEFAULT_RETRY_MS;
  let failures = 0;
  while (!signal.aborted) {
    let wait = 0;
    let response = null;
    state("connecting");
    try {
      const {url, headers} = await request();
      response = await fetchImpl(url, {headers, credentials, cache: "no-store", signal});
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof StreamError) return fail(error);
      response = null; // the network: try again
    }
    if (response !== null && response.status === 204) {
      return noContent();
    }
    if (response !== null && response.ok && !isEventStream(response)) {
      // A page, not a stream (a wrong URL or base): waiting will not change it.
      response.body?.cancel().catch(() => {});
      const type = response.headers.get("content-type") || "no content type";
      return fail(new StreamError(`${response.status} but ${type}, not a stream: ${response.url}`, {reason: "http", status: response.status}));
    }
    if (response !== null && response.ok) {
      failures = 0; // the server answers: a drop from here on is retried after retry: alone
      state("open");
      let again = false;
      try {
        for await (const item of readEvents(response.body)) {
          if (item.retry !== undefined) {
            retryMs = item.retry;
            continue;
          }
          const verdict = message(item);
          if (verdict === true) return;
          if (verdict === "reconnect") {
            again = true;
            break;
          }
        }
        if (!again && ended()) return;
      } catch (error) {
        if (signal.aborted) return;
        // the connection dropped mid-stream: resume where it stopped
      }
      if (again) continue;
    } else if (response !== null) {
      const status = response.status;
      if (status !== 429 && status < 500) {
        const text = (await response.text().catch(() => "")).trim();
        return fail(new StreamError(`${status} ${text || response.statusText}`, {reason: "http", status}));
      }
      wait = retryAfterMs(response);
      response.body?.cancel().catch(() => {});
    }
    failures += 1;
    const delay = Math.max(wait, Math.min(retryMs * failures, MAX_RETRY_MS));
    state("reconnecting", {delay});
    await sleep(delay, signal);
  }
}

function isEventStream(response) {
  return (response.headers.get("content-type") || "").split(";")[0].trim() === "text/event-stream";
}

async function resolveToken(token) {
  return typeof token === "function" ? await token() : token;
}

function authHeaders(token, accept) {
  const headers = {Accept: accept};
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

// -- one task ------------------------------------------------------------------

/**
 * Follow one task's stream.
 *
 * target: a stream URL or path ("/stream/Report/7", with ?token=... if you like)
 *   or {model: "Report", id: 7, app: "myapp"} (app only when the name is ambiguous).
 * options:
 *   on: {<event type>: (data, event) => ...}   one callback per event type
 *   onEvent: (event) => ...                    every event: {type, id, data, raw, model, taskId}
 *                                               (data: parsed JSON; raw: the text as sent)
 *   onState: (state, detail) => ...            "connecting", "open", "reconnecting"
 *                                               ({delay}), "ended", "failed" (error), "closed"
 *   token: a stream token, or a function (async or not) that returns one,
 *          asked at every (re)connection: a fresh token resumes past an expiry
 *   history: true  every event from the first (else the latest event, then the live ones)
 *   after: n       resume after event id n
 *   base: "https://streams.example.com"   another origin (see the server's CORS settings)
 *   credentials: fetch's credentials ("same-origin" by default: the session cookie)
 * Returns {result, close(), lastEventId, state}: result is a Promise of what
 * process() returned (from the complete event, or the JSON status when the event
 * leaves it open: {} or a lone "result" key) that rejects with a StreamError on
 * error, cancelled, a refused request or close().
 */
export function watchTask(target, options = {}) {
  const {
    on = {}, onEvent, onState, token, history = false, after = null, base = "",
    credentials = "same-origin", fetch: fetchImpl = globalThis.fetch.bind(globalThis),
  } = options;
  const url = new URL(base + streamPath(target), globalThis.location?.href);
  const controller = new AbortController();
  const outcomeSlot = deferred();
  let cursor = after === null || after === undefined ? null : Number(after);
  let current = null;

  const setState = (state, detail) => {
    if (current === state && state !== "reconnecting") return;
    current = state;
    call(onState, state, detail);
  };
  const finish = (error, value) => {
    settle(outcomeSlot, error, value);
    setState(error ? (error.reason === "closed" ? "closed" : "failed") : "ended", error || undefined);
    controller.abort();
  };

  const request = async () => {
    const requestUrl = new URL(url);
    if (cursor === null && history) requestUrl.searchParams.set("history", "all");
    const headers = authHeaders(await resolveToken(token), "text/event-stream");
    if (cursor !== null) headers["Last-Event-ID"] = String(cursor);
    return {url: requestUrl, headers};
  };

  const message = (item) => {
    const data = parseData(item.data);
    const id = item.id === null ? null : Number(item.id);
    if (id !== null) {
      if (cursor !== null && id <= cursor) return false; // seen already
      cursor = id;
    }
    const event = {type: item.type, id, data, raw: item.data, model: data?._model, taskId: data?._task_id};
    call(on[item.type], data, event);
    call(onEvent, event);
    if (id !== null && TERMINAL.has(item.type)) {
      settleEnd(item.type, data, () => readStatus(fetchImpl, url, token, credentials)).then((end) => finish(...end));
      return true;
    }
    if (id === null && item.type === "access_expired") {
      if (typeof token === "function") return "reconnect"; // a fresh token resumes
      finish(new StreamError((data && data.message) || "Stream token expired", {reason: "access_expired", data}));
      return true;
    }
    return false;
  };

  // 204: the task ended before our cursor; its JSON status says how.
  const noContent = async () => {
    try {
      finish(...statusOutcome(await readStatus(fetchImpl, url, token, credentials)));
    } catch (error) {
      if (!outcomeSlot.settled) finish(error instanceof StreamError ? error : new StreamError(String(error), {reason: "http"}));
    }
  };

  follow({
    fetchImpl, credentials, signal: controller.signal, request, message, noContent,
    ended: () => false, // a stream that ends before its terminal event is resumed
    fail: (error) => finish(error),
    state: setState,
  });

  return {
    result: outcomeSlot.promise,
    close() {
      if (!outcomeSlot.settled) finish(new StreamError("Closed", {reason: "closed"}));
    },
    get lastEventId() { return cursor; },
    get state() { return current; },
  };
}

// -- many tasks, one connection ------------------------------------------------

/**
 * Follow several tasks and/or feeds over one connection (the multiplexed stream).
 *
 * spec: {tasks: [target, ...], feeds: ["Report", "myapp/Export", ...]}; a target
 *   is "Report/7", "myapp/Report/7", a stream path or {model, id, app}; "Report/7@12"
 *   or {model, id, after: 12} resumes that task after its event 12.
 * options: on, onEvent, onState, token, history, base, credentials as for
 *   watchTask; onTask: (key, event) => ... the first event of a task the watch
 *   did not know (from a feed). Each event also has `key` ("<Model>/<id>", from
 *   its data) and `name` (the task as the watch names it on a reconnect: as
 *   listed, or a feed's task by that feed's model, "myapp/Export/9").
 *   streamRoot: the multiplexed stream's path ("/stream/").
 * Events say their model by class name only (_model), so one watch cannot
 * follow two models of one class name in different apps ("a/Report" and
 * "b/Report") where their tasks could meet (a feed of either, or one id
 * listed twice): that throws a TypeError; watch them on connections of their own.
 * Returns {results, result(target), done, close(), cursors}:
 *   results: a Map of key -> Promise of what the task returned (as watchTask's result);
 *   done: a Promise settled when the watch ends (every listed task ended, and no
 *   feed) or fails; close() ends it. A feed keeps the connection open until close().
 */
export function watchStreams({tasks = [], feeds = []} = {}, options = {}) {
  const {
    on = {}, onEvent, onState, onTask, token, history = false, base = "", streamRoot = "/stream/",
    credentials = "same-origin", fetch: fetchImpl = globalThis.fetch.bind(globalThis),
  } = options;
  const url = new URL(base + streamRoot, globalThis.location?.href);
  const controller = new AbortController();
  const doneSlot = deferred();
  const known = new Map(); // key -> {name, cursor, ended, slot, listed}
  const pending = []; // values of ended tasks still being read from their JSON status
  const statusUrl = (entry) => new URL(base + namePath(entry.name), globalThis.location?.href);
  let current = null;

  const track = (name, listed) => {
    const key = taskKey(name);
    let entry = known.get(key);
    if (!entry) {
      entry = {name, cursor: null, ended: false, slot: deferred(), listed};
      known.set(key, entry);
    } else if (listed) {
      sameModel(modelOf(entry.name), modelOf(name));
    }
    return entry;
  };
  for (const target of tasks) {
    // A target may say where to resume: "Model/id@n" or {model, id, after: n}.
    let after = typeof target === "object" && target !== null ? target.after : undefined;
    let name = target;
    if (typeof target === "string" && /@\d+$/.test(target)) {
      [name, after] = [target.slice(0, target.lastIndexOf("@")), target.slice(target.lastIndexOf("@") + 1)];
    }
    const entry = track(taskName(name), true);
    if (after !== undefined && after !== null) entry.cursor = Number(after);
  }
  const feedNames = feeds.map((feed) => String(feed));
  // A feed's model by class name, as the caller named it: a task a feed brings
  // is named after it on reconnects, since its events' _model has no app label
  // (and a bare name two apps share is a 404). A qualified name wins over a bare one.
  const feedModels = new Map();
  for (const feed of feedNames) {
    const other = feedModels.get(classOf(feed));
    if (other !== undefined) sameModel(other, feed);
    if (other === undefined || !other.includes("/")) feedModels.set(classOf(feed), feed);
  }
  for (const entry of known.values()) {
    const feed = feedModels.get(classOf(modelOf(entry.name)));
    if (feed !== undefined) sameModel(feed, modelOf(entry.name));
  }

  const setState = (state, detail) => {
    if (current === state && state !== "reconnecting") return;
    current = state;
    call(onState, state, detail);
  };
  const finish = (error) => {
    controller.abort();
    if (error) {
      for (const entry of known.values()) settle(entry.slot, error);
      settle(doneSlot, error.reason === "closed" ? null : error);
      setState(error.reason === "closed" ? "closed" : "failed", error);
      return;
    }
    // Every task ended: done once the values still being read are in.
    for (const entry of known.values()) {
      if (!entry.ended) settle(entry.slot, new StreamError("Closed", {reason: "closed"}));
    }
    Promise.all(pending).then(() => {
      settle(doneSlot, null);
      setState("ended");
    });
  };
  const allEnded = () => feedNames.length === 0 && [...known.values()].every((entry) => entry.ended);

  const request = async () => {
    const requestUrl = new URL(url);
    // Listed tasks first, then those a feed brought: at most MAX_MUX_TASKS (past
    // that, a feed still brings a running task back from its latest event).
    const open = [...known.values()].filter((entry) => !entry.ended);
    open.sort((a, b) => Number(b.listed) - Number(a.listed));
    for (const entry of open.slice(0, MAX_MUX_TASKS)) {
      requestUrl.searchParams.append("task", entry.cursor === null ? entry.name : `${entry.name}@${entry.cursor}`);
    }
    for (const feed of feedNames) requestUrl.searchParams.append("feed", feed);
    if (history) requestUrl.searchParams.set("history", "all");
    return {url: requestUrl, headers: authHeaders(await resolveToken(token), "text/event-stream")};
  };

  const message = (item) => {
    const data = parseData(item.data);
    const id = item.id === null ? null : Number(item.id);
    if (id === null) {
      const event = {type: item.type, id, data, raw: item.data, key: null, name: null, model: undefined, taskId: undefined};
      call(on[item.type], data, event);
      call(onEvent, event);
      if (item.type === "access_expired") {
        if (typeof token === "function") return "reconnect";
        finish(new StreamError((data && data.message) || "Stream token expired", {reason: "access_expired", data}));
        return true;
      }
      return false;
    }
    if (!data || typeof data !== "object" || data._model === undefined || data._task_id === undefined) return false;
    const key = `${data._model}/${data._task_id}`;
    const isNew = !known.has(key);
    // A task not listed came from a feed: named after the feed's model.
    const model = feedModels.get(String(data._model)) ?? data._model;
    const entry = isNew ? track(`${model}/${data._task_id}`, false) : known.get(key);
    if (entry.ended || (entry.cursor !== null && id <= entry.cursor)) return false; // seen already
    entry.cursor = id;
    const event = {type: item.type, id, data, raw: item.data, key, name: entry.name, model: data._model, taskId: data._task_id};
    if (isNew) call(onTask, key, event);
    call(on[item.type], data, event);
    call(onEvent, event);
    if (TERMINAL.has(item.type)) {
      entry.ended = true;
      if (entry.listed) {
        // The value as watchTask gives it (the JSON status when the event leaves it open).
        const status = () => readStatus(fetchImpl, statusUrl(entry), token, credentials);
        pending.push(settleEnd(item.type, data, status).then(([error, value]) => settle(entry.slot, error, value)));
      } else {
        // A task a feed brought: no request per task, the event's reading.
        const [error, value] = item.type === "complete" ? [null, completeValue(data).value] : failure(item.type, data);
        settle(entry.slot, error, value);
      }
      // A task a feed brought is done with: forget it, so a feed open for days
      // holds only the tasks still running.
      if (!entry.listed) known.delete(key);
      if (allEnded()) {
        finish(null);
        return true;
      }
    }
    return false;
  };

  // 204: every listed task had ended before its cursor: their JSON statuses say how.
  const noContent = async () => {
    for (const entry of known.values()) {
      if (entry.ended) continue;
      entry.ended = true;
      pending.push(readStatus(fetchImpl, statusUrl(entry), token, credentials).then(
        (status) => settle(entry.slot, ...statusOutcome(status)),
        (error) => settle(entry.slot, error instanceof StreamError ? error : new StreamError(String(error), {reason: "http"})),
      ));
    }
    finish(null);
  };

  follow({
    fetchImpl, credentials, signal: controller.signal, request, message, noContent,
    ended: () => {
      if (!allEnded()) return false;
      finish(null);
      return true;
    },
    fail: (error) => finish(error),
    state: setState,
  });

  const results = new Map([...known].filter(([, entry]) => entry.listed).map(([key, entry]) => [key, entry.slot.promise]));
  return {
    results,
    result(target) {
      const entry = known.get(taskKey(taskName(target)));
      return entry ? entry.slot.promise : Promise.reject(new TypeError(`Not watched: ${taskName(target)}`));
    },
    done: doneSlot.promise,
    close() {
      if (!doneSlot.settled) finish(new StreamError("Closed", {reason: "closed"}));
    },
    get cursors() {
      return Object.fromEntries([...known].map(([key, entry]) => [key, entry.cursor]));
    },
    get state() { return current; },
  };
}

/** Several tasks over one connection: watchStreams({tasks: targets}, options). */
export function watchTasks(targets, options = {}) {
  return watchStreams({tasks: targets}, options);
}

/** Every task of the models, live (those running now, and every one that starts
 * later) until close(): watchStreams({feeds: models}, options). */
export function watchFeed(models, options = {}) {
  return watchStreams({feeds: Array.isArray(models) ? models : [models]}, options);
}
