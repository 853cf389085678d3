// Each queue's full status (with its images) from GET /queue-status, at most one request in flight
// per queue, spaced by the queue's size, and conditional: while the status has not changed the
// server answers 304 and the last answer stands. Live events ask for it; its answer settles what
// events can only approximate.

import { ApiError, getIfChanged, reportError } from "./api.js";
import { render } from "./cards.js";
import { mergeImages, mergeStatus } from "./model.js";
import { isShown, placeCard, removeQueue } from "./queues.js";
import { currentToken } from "./token.js";

const URL_REFRESH_MIN_MS = 30000;

function statusDelay(q) {
  return Math.min(5000, Math.max(800, (q.status.total || 0) * 3));
}

// delay 0: now; undefined: after the queue's usual spacing, unless a fetch is already due.
export function scheduleStatus(q, delay) {
  if (q.fetching) {
    q.dirty = true;
    return;
  }
  if (q.timer) {
    if (delay !== 0) return;
    clearTimeout(q.timer);
  }
  q.timer = setTimeout(() => fetchStatus(q), delay === undefined ? statusDelay(q) : delay);
}

async function fetchStatus(q) {
  q.timer = null;
  if (!isShown(q) || !currentToken()) return;
  q.fetching = true;
  const seq = q.seq;
  // Renewed image URLs need not change the status, so after a broken image the status is asked in full.
  const renew = q.renewUrls;
  q.renewUrls = false;
  try {
    q.lastStatus = await getIfChanged(`/queue-status/${encodeURIComponent(q.id)}`, renew ? null : q.lastStatus);
    if (!isShown(q)) return;
    // After a 304 this is the last answer again, merged as if it had come in full.
    const s = q.lastStatus.data;
    if (mergeStatus(q, s, seq)) {
      if (s.finished_at) q.final = true;
    }
    mergeImages(q, s.images || [], false);
    placeCard(q, "prepend");
    render(q);
  } catch (err) {
    if (!isShown(q)) return;
    q.renewUrls = q.renewUrls || renew;
    if (err instanceof ApiError && err.status === 404) {
      removeQueue(q);
      return;
    }
    const wait = reportError(err, "load a queue's status", true);
    if (wait) {
      q.fetching = false;
      scheduleStatus(q, wait * 1000);
      return;
    }
  } finally {
    q.fetching = false;
  }
  if (q.dirty) {
    q.dirty = false;
    scheduleStatus(q);
  }
}

// Signed image URLs expire; a broken one asks for fresh URLs, at most every URL_REFRESH_MIN_MS.
export function refreshUrls(q) {
  const now = Date.now();
  if (now - q.urlsAt < URL_REFRESH_MIN_MS) return;
  q.urlsAt = now;
  q.renewUrls = true;
  scheduleStatus(q, 0);
}
