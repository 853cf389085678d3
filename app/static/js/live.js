// Live updates: the user's Server-Sent Events stream (GET /events), reopened with back-off, and
// what each event changes on the page.

import { ApiError, api, reportError } from "./api.js";
import { render } from "./cards.js";
import { $ } from "./dom.js";
import { refreshActive } from "./lists.js";
import { COUNT_KEYS, forgetUnfinishedImages, mergeProgress } from "./model.js";
import { scheduleStatus } from "./polling.js";
import { placeCard, queues, upsertQueue } from "./queues.js";
import { currentToken } from "./token.js";

const STREAM_RETRY_MAX_MS = 30000;

const stream = { source: null, gen: 0, failures: 0, opened: false, timer: null };

export function setLive(mode) {
  const live = $("live");
  live.dataset.state = mode;
  live.textContent = { live: "live", connecting: "connecting…", off: "offline" }[mode];
}

export function stopStream() {
  stream.gen += 1;
  clearTimeout(stream.timer);
  if (stream.source) stream.source.close();
  stream.source = null;
}

// For a new token: the next stream is a first one again.
export function resetStream() {
  stopStream();
  stream.opened = false;
  stream.failures = 0;
}

function retryStream(atLeastSeconds = 0) {
  clearTimeout(stream.timer);
  const wait = Math.max(atLeastSeconds * 1000, Math.min(STREAM_RETRY_MAX_MS, 1000 * 2 ** stream.failures));
  stream.failures += 1;
  stream.timer = setTimeout(openStream, wait);
}

export async function openStream() {
  stopStream();
  if (!currentToken()) return;
  const gen = stream.gen;
  setLive("connecting");
  let streamToken;
  try {
    streamToken = (await api("POST", "/stream-token")).token;
  } catch (err) {
    if (gen !== stream.gen) return;
    const wait = reportError(err, "open the live updates", true);
    if (!(err instanceof ApiError && err.status === 401)) retryStream(wait || 0);
    return;
  }
  if (gen !== stream.gen) return;
  // A stream token lives 5 minutes; a connection that drops later is reopened here with a new one.
  const es = new EventSource(`/events?token=${encodeURIComponent(streamToken)}`);
  stream.source = es;
  es.addEventListener("open", () => {
    setLive("live");
    // Events missed while reconnecting are not replayed: catch up from the lists.
    if (stream.opened) refreshActive();
    stream.opened = true;
    stream.failures = 0;
  });
  const handle = (event) => {
    try {
      onEvent(JSON.parse(event.data));
    } catch (err) {
      console.error("bad event", err);
    }
  };
  es.addEventListener("queue", handle);
  es.addEventListener("image", handle);
  es.addEventListener("image.progress", (event) => {
    try {
      onProgress(JSON.parse(event.data));
    } catch (err) {
      console.error("bad event", err);
    }
  });
  es.addEventListener("error", () => {
    if (gen !== stream.gen) return;
    if (es.readyState === EventSource.CLOSED) {
      stream.source = null;
      setLive("off");
      retryStream();
    } else {
      setLive("connecting");
    }
  });
}

// Step progress of a running image: redraws its tile only (no status fetch: counts did not change).
function onProgress(ev) {
  if (!ev || typeof ev.index !== "number") return;
  const q = queues.get(ev.queue_id);
  if (q && mergeProgress(q, ev)) render(q);
}

function onEvent(ev) {
  if (!ev || !ev.queue_id) return;
  let q = queues.get(ev.queue_id);
  const counts = ev.counts || {};
  if (!q) {
    // A queue made elsewhere (another tab, the API): show it and load its details.
    q = upsertQueue({
      queue_id: ev.queue_id, status: ev.queue_status || "pending", total: counts.total || 0,
      pending: counts.pending || 0, running: counts.running || 0, succeeded: counts.succeeded || 0,
      failed: counts.failed || 0, cancelled: counts.cancelled || 0, created_at: null,
    });
    scheduleStatus(q, 0);
  }
  q.seq += 1;
  const s = q.status;
  if (ev.queue_status) s.status = ev.queue_status;
  for (const key of ["total", ...COUNT_KEYS]) {
    if (typeof counts[key] === "number") s[key] = counts[key];
  }
  if (ev.type === "image" && typeof ev.index === "number") {
    const old = q.images.get(ev.index) || { index: ev.index, prompt: null, seed: null };
    q.images.set(ev.index, {
      ...old, status: ev.status, error: ev.error || null, attempt: ev.attempt || old.attempt || 0,
      url: ev.status === "succeeded" ? ev.url || null : null,
      thumb: ev.status === "succeeded" ? ev.thumbnail_url || null : null,
      progress: ev.status === "running" && old.attempt === ev.attempt ? old.progress || null : null,
      preview: ev.status === "running" && old.attempt === ev.attempt ? old.preview || null : null,
    });
  }
  if (ev.type === "queue" && ev.retried) {
    q.final = false;
    s.finished_at = null;
    forgetUnfinishedImages(q);
    scheduleStatus(q, 0);
  }
  if (ev.final) {
    q.final = true;
    s.finished_at = s.finished_at || new Date().toISOString();
    s.eta_seconds = null;
    scheduleStatus(q, 0);
  } else {
    scheduleStatus(q);
  }
  placeCard(q, "prepend");
  render(q);
}
