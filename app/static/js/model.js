// A queue as the page knows it: the server's status merged with live events, images by index.
// No DOM here.

const IMAGE_RANK = { pending: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };
export const COUNT_KEYS = ["pending", "running", "succeeded", "failed", "cancelled"];

export function newQueue(s, expanded) {
  const q = {
    id: s.queue_id, status: { ...s }, images: new Map(), tiles: new Map(), final: false, expanded,
    seq: 0, timer: null, fetching: false, dirty: false, renderQueued: false, urlsAt: 0,
    lastStatus: null, renewUrls: false,
  };
  delete q.status.images;
  return q;
}

export function isFinished(q) {
  return Boolean(q.status.finished_at) || q.final;
}

export function doneCount(s) {
  return (s.succeeded || 0) + (s.failed || 0) + (s.cancelled || 0);
}

// Images only move pending -> running -> terminal within an attempt, so this never decreases.
function advancement(s) {
  return (s.running || 0) + 2 * doneCount(s);
}

// A status answer may be older than events that arrived while it was in flight: it wins only when
// no event came in meanwhile (seqAtStart null: unknown), or when it shows at least as much progress.
export function mergeStatus(q, s, seqAtStart) {
  const fresh = q.seq === seqAtStart || advancement(s) >= advancement(q.status)
    || (s.attempt || 1) > (q.status.attempt || 1);
  if (!fresh) return false;
  const copy = { ...s };
  delete copy.images;
  q.status = { ...q.status, ...copy };
  if (!s.finished_at) q.final = false;
  return true;
}

// Whether the image as known is already past `step` of this attempt (a late or slower report is behind).
function isAhead(old, attempt, step) {
  return Boolean(old && old.progress && old.attempt === attempt && old.progress.step > step);
}

export function mergeImages(q, images, force) {
  for (const img of images) {
    const old = q.images.get(img.index);
    if (!force && old && IMAGE_RANK[img.status] < IMAGE_RANK[old.status] && old.attempt >= (img.attempts || 0)) {
      continue;
    }
    const attempt = img.attempts || 0;
    let progress = img.status === "running" ? img.progress || null : null;
    let preview = img.status === "running" ? img.preview_url || null : null;
    // Live image.progress events may be ahead of a status answer: the furthest step of the attempt wins.
    if (progress && isAhead(old, attempt, progress.step)) {
      progress = old.progress;
      preview = old.preview || preview;
    }
    q.images.set(img.index, {
      index: img.index, prompt: img.prompt, seed: img.seed, status: img.status, error: img.error,
      url: img.url || (old && img.status === old.status ? old.url : null), attempt,
      thumb: img.thumbnail_url || (old && img.status === old.status ? old.thumb : null),
      progress, preview,
    });
  }
}

// A running image's step progress from an image.progress event (live only, throttled by the server).
// Returns whether it changed anything shown.
export function mergeProgress(q, ev) {
  const old = q.images.get(ev.index);
  if (old && (IMAGE_RANK[old.status] > IMAGE_RANK.running || (old.attempt || 0) > ev.attempt)) return false;
  // Pending again at this attempt (handed back): its run is over, whatever late progress says.
  if (old && old.status === "pending" && (old.attempt || 0) >= ev.attempt) return false;
  if (isAhead(old, ev.attempt, ev.step)) return false;
  const base = old || { index: ev.index, prompt: null, seed: null, error: null, url: null, thumb: null };
  q.images.set(ev.index, {
    ...base, status: "running", attempt: ev.attempt,
    progress: { step: ev.step, steps: ev.steps, fraction: ev.fraction },
    preview: ev.preview_url || (old && old.attempt === ev.attempt ? old.preview : null) || null,
  });
  return true;
}

// A retried queue runs its failed and cancelled images again: only the succeeded ones still stand.
export function forgetUnfinishedImages(q) {
  for (const [index, img] of q.images) {
    if (img.status !== "succeeded") q.images.delete(index);
  }
}
