// A queue's card: title, status, progress bar, counts and its grid of image tiles.
// Drawing only; what the card's buttons and tiles do is in actions.js.

import { $, el } from "./dom.js";
import { clock, duration } from "./format.js";
import { doneCount, isFinished } from "./model.js";

// Finished queues in the history show this many tiles until "Show all" is pressed.
const HISTORY_THUMBS = 12;

function queueTitle(s) {
  if (s.name) return s.name;
  const first = s.images && s.images.length ? s.images[0].prompt : "";
  return first || `Queue ${s.queue_id.slice(0, 8)}`;
}

export function createCard(q) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.queueId = q.id;
  const pick = (sel) => node.querySelector(sel);
  q.el = {
    card: node, title: pick(".card-title"), status: pick(".status"), bar: pick(".bar"),
    segs: {
      succeeded: pick(".seg.succeeded"), failed: pick(".seg.failed"),
      cancelled: pick(".seg.cancelled"), running: pick(".seg.running"),
    },
    label: pick(".progress-label"), counts: pick(".counts"), extra: pick(".extra"),
    warnings: pick(".warnings"), thumbs: pick(".thumbs"), showAll: pick(".show-all"),
    cancel: pick(".cancel"), retry: pick(".retry"), del: pick(".delete"),
  };
  q.el.title.title = q.id;
}

// Draws at the next frame, once however many updates arrive before it.
export function render(q) {
  if (q.renderQueued) return;
  q.renderQueued = true;
  requestAnimationFrame(() => {
    q.renderQueued = false;
    renderNow(q);
  });
}

function renderNow(q) {
  const s = q.status;
  const e = q.el;
  const total = s.total || 0;
  const finished = isFinished(q);
  const status = s.status || "pending";
  e.card.dataset.status = status;
  e.card.dataset.finished = String(finished);
  e.title.textContent = queueTitle({ ...s, images: q.images.size ? [q.images.values().next().value] : [] });
  e.status.textContent = status === "cancelled" && !finished ? "cancelling" : status;
  e.status.dataset.status = status;

  const done = doneCount(s);
  const pct = total ? (done / total) * 100 : 0;
  for (const key of ["succeeded", "failed", "cancelled", "running"]) {
    e.segs[key].style.width = `${total ? ((s[key] || 0) / total) * 100 : 0}%`;
  }
  const shown = Math.floor(pct);
  e.bar.setAttribute("aria-valuenow", String(shown));
  e.bar.setAttribute("aria-label", `${queueTitle(s)}: ${shown}% done`);
  e.card.dataset.progress = String(shown);
  e.label.textContent = `${shown}%`;

  const parts = [`${done}/${total} done`];
  if (s.running) parts.push(`${s.running} running`);
  if (s.failed) parts.push(`${s.failed} failed`);
  if (s.cancelled) parts.push(`${s.cancelled} cancelled`);
  e.counts.textContent = parts.join(" · ");

  const extra = [];
  if (!finished && s.pending && s.position) extra.push(`${s.position} ahead`);
  if (!finished && typeof s.eta_seconds === "number" && s.eta_seconds > 0) extra.push(`≈ ${duration(s.eta_seconds)} left`);
  if (s.priority && s.priority !== "normal") extra.push(`${s.priority} priority`);
  if (s.tags && s.tags.length) extra.push(s.tags.map((t) => `#${t}`).join(" "));
  if (s.created_at) extra.push(clock(s.created_at));
  e.extra.textContent = extra.join(" · ");

  const warnings = (s.warnings || []).filter(Boolean);
  e.warnings.hidden = finished || warnings.length === 0;
  e.warnings.textContent = warnings.join(" ");

  e.cancel.hidden = finished || status === "cancelled";
  e.retry.hidden = !finished || !(s.failed || s.cancelled);
  e.del.hidden = !finished;
  renderTiles(q);
}

// Tiles are kept per image index and moved into order, so a running grid does not flicker.
function renderTiles(q) {
  const all = [...q.images.values()]
    .filter((img) => (img.status === "succeeded" && img.url) || img.status === "failed" || img.status === "running")
    .sort((a, b) => a.index - b.index);
  const limited = !q.expanded && all.length > HISTORY_THUMBS;
  const wanted = limited ? all.slice(0, HISTORY_THUMBS) : all;
  q.el.showAll.hidden = !(limited || (q.expanded && q.collapsible && all.length > HISTORY_THUMBS));
  q.el.showAll.textContent = q.expanded ? "Show fewer" : `Show all ${all.length}`;

  const keep = new Set(wanted.map((img) => img.index));
  for (const [index, tile] of q.tiles) {
    if (!keep.has(index)) {
      tile.remove();
      q.tiles.delete(index);
    }
  }
  let prev = null;
  for (const img of wanted) {
    let tile = q.tiles.get(img.index);
    if (!tile) {
      tile = el("button", { type: "button", class: "tile" });
      q.tiles.set(img.index, tile);
    }
    updateTile(tile, img);
    const expected = prev ? prev.nextSibling : q.el.thumbs.firstChild;
    if (expected !== tile) q.el.thumbs.insertBefore(tile, expected);
    prev = tile;
  }
}

function updateTile(tile, img) {
  tile.dataset.index = String(img.index);
  if (img.status !== "running" || !(img.progress || img.preview)) {
    delete tile.dataset.progress;
    delete tile.dataset.preview;
  }
  tile.dataset.status = img.status;
  const label = `#${img.index}${img.prompt ? `: ${img.prompt}` : ""}`;
  tile.title = img.status === "failed" ? `${label}\nfailed: ${img.error || "unknown error"}` : label;
  tile.setAttribute("aria-label", img.status === "succeeded" ? `Open image ${label}` : `${label} (${img.status})`);
  if (img.status === "succeeded" && img.url) {
    let image = tile.querySelector("img.tile-image");
    if (!image) {
      tile.replaceChildren();
      image = el("img", { class: "tile-image", loading: "lazy", decoding: "async", alt: "" });
      image.addEventListener("error", retryTileImage);
      tile.append(image);
    }
    image.alt = img.prompt || `image ${img.index}`;
    // Tiles show the ~256 px thumbnail (a few KB); the lightbox loads the full image.
    const src = img.thumb || img.url;
    if (image.dataset.src !== src) {
      image.dataset.src = src;
      image.dataset.tries = "0";
      image.src = src;
    }
  } else if (img.status === "failed") {
    tile.replaceChildren(el("span", { class: "tile-label", text: "failed" }),
      el("span", { class: "tile-error", text: img.error || "" }));
  } else if (img.status === "running" && (img.progress || img.preview)) {
    runningTile(tile, img);
  } else {
    tile.replaceChildren(el("span", { class: "tile-label", text: "…" }));
  }
  // Not `disabled`: a failed tile keeps its tooltip and stays focusable for its error text.
  tile.setAttribute("aria-disabled", String(img.status !== "succeeded"));
}

// A thumbnail the API is still making answers 503 (Retry-After: 2) when many are asked for at once:
// the tile asks again, a little later each time, a few times.
const TILE_RETRIES = 5;
function retryTileImage(event) {
  const image = event.currentTarget;
  const src = image.dataset.src;
  const tries = Number(image.dataset.tries || 0) + 1;
  if (!src || tries > TILE_RETRIES) return;
  image.dataset.tries = String(tries);
  setTimeout(() => {
    if (image.dataset.src === src) image.src = `${src}${src.includes("?") ? "&" : "?"}retry=${tries}`;
  }, 2000 * tries);
}

// A running image with step progress: its latest preview (when the provider sends them) under a
// bar and a step counter. The elements stay, so each step only moves the bar and swaps the preview.
function runningTile(tile, img) {
  let bar = tile.querySelector(".tile-progress");
  if (!bar) {
    bar = el("span", { class: "tile-progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
    bar.append(el("span", { class: "tile-progress-fill" }));
    tile.replaceChildren(el("span", { class: "tile-step" }), bar);
  }
  // Steps may be unknown (0) while a provider already sends previews.
  const { step, steps, fraction } = img.progress || { step: 0, steps: 0, fraction: 0 };
  const pct = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  bar.firstChild.style.width = `${pct}%`;
  bar.setAttribute("aria-valuenow", String(pct));
  tile.dataset.progress = String(pct);
  tile.querySelector(".tile-step").textContent = steps > 0 ? `${step}/${steps}` : "";
  let preview = tile.querySelector("img.tile-preview");
  if (img.preview) {
    if (!preview) {
      preview = el("img", { class: "tile-preview", decoding: "async", alt: "" });
      tile.prepend(preview);
    }
    if (preview.getAttribute("src") !== img.preview) preview.src = img.preview;
  } else if (preview) {
    preview.remove();
  }
  tile.dataset.preview = String(Boolean(img.preview));
}
