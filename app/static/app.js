// imagequeue web client: plain DOM, no build step. User text only ever goes through textContent.
(() => {
  "use strict";

  const TOKEN_KEY = "imagequeue.token";
  const HISTORY_PAGE = 20;
  const HISTORY_THUMBS = 12;
  const REQUEST_TIMEOUT_MS = 20000;
  const STREAM_RETRY_MAX_MS = 30000;
  const URL_REFRESH_MIN_MS = 30000;
  const TERMINAL_IMAGE = new Set(["succeeded", "failed", "cancelled"]);
  const IMAGE_RANK = { pending: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };
  const COUNT_KEYS = ["pending", "running", "succeeded", "failed", "cancelled"];
  const FORM_FIELDS = ["prompts", "prompt", "variables", "count", "width", "height", "seed", "priority", "name",
    "negative_prompt", "tags", "model"];

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    queues: new Map(),
    stream: null,
    streamGen: 0,
    streamFailures: 0,
    streamOpened: false,
    streamTimer: null,
    refreshTimer: null,
    createKey: null,
    creating: false,
    holdUntil: 0,
    holdTimer: null,
    history: { offset: 0, total: 0, loading: false, search: "", status: "" },
    lightbox: null,
  };

  // ---------- small helpers ----------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function newKey() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function clock(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return "";
    const sameDay = d.toDateString() === new Date().toDateString();
    return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  function isFinished(q) {
    return Boolean(q.status.finished_at) || q.final;
  }

  function doneCount(s) {
    return (s.succeeded || 0) + (s.failed || 0) + (s.cancelled || 0);
  }

  // Images only move pending -> running -> terminal within an attempt, so this never decreases.
  function advancement(s) {
    return (s.running || 0) + 2 * doneCount(s);
  }

  // ---------- messages ----------

  const messages = new Map();

  function showMessage(key, kind, title, lines = [], timeoutMs = 0) {
    clearMessage(key);
    const close = el("button", { type: "button", class: "close", text: "✕", "aria-label": "Dismiss" });
    const box = el("div", { class: `message ${kind}`, "data-key": key, role: kind === "error" ? "alert" : "status" },
      el("strong", { text: title }));
    if (lines.length) box.append(el("ul", {}, ...lines.map((line) => el("li", { text: line }))));
    box.append(close);
    close.addEventListener("click", () => clearMessage(key));
    $("messages").append(box);
    const entry = { box, timer: null };
    if (timeoutMs) entry.timer = setTimeout(() => clearMessage(key), timeoutMs);
    messages.set(key, entry);
  }

  function clearMessage(key) {
    const entry = messages.get(key);
    if (!entry) return;
    clearTimeout(entry.timer);
    entry.box.remove();
    messages.delete(key);
  }

  // ---------- HTTP ----------

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(typeof detail === "string" ? detail : `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, { body, headers } = {}) {
    const h = { Accept: "application/json", ...(headers || {}) };
    if (state.token) h.Authorization = `Bearer ${state.token}`;
    if (body !== undefined) h["Content-Type"] = "application/json";
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let res;
    let text;
    try {
      res = await fetch(path, {
        method, headers: h, cache: "no-store", signal: abort.signal,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      text = await res.text();
    } catch (err) {
      throw new ApiError(0, err && err.name === "AbortError" ? "the server did not answer in time" : "network error");
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = text; }
    }
    if (!res.ok) {
      const detail = data && typeof data === "object" && "detail" in data ? data.detail : (text || res.statusText);
      const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
      throw new ApiError(res.status, detail, Number.isFinite(retry) ? retry : null);
    }
    clearMessage("network");
    clearMessage("store");
    return data;
  }

  function validationLines(detail) {
    if (!Array.isArray(detail)) return [String(detail)];
    return detail.map((item) => {
      const loc = Array.isArray(item.loc) ? item.loc.filter((part, i) => !(i === 0 && part === "body")) : [];
      const where = loc.length ? `${loc.join(" › ")}: ` : "";
      return `${where}${item.msg || JSON.stringify(item)}`;
    });
  }

  function detailText(detail) {
    if (typeof detail === "string") return detail;
    return validationLines(detail).join("; ");
  }

  // Tells the person what went wrong and what happens next; returns seconds until a retry makes sense.
  // Background loads retry by themselves; actions (create, cancel, ...) are left to the person.
  function reportError(err, doing, background = false) {
    const what = `Could not ${doing}`;
    if (!(err instanceof ApiError)) {
      showMessage("action", "error", `${what}: ${err}`);
      return null;
    }
    const wait = err.retryAfter || 5;
    const next = background ? `Retrying in ${duration(wait)}.` : `Try again in ${duration(wait)}.`;
    switch (err.status) {
      case 0:
        showMessage(background ? "network" : "action", "error",
          `${what}: cannot reach the server (${err.detail}).`, [`Check the connection. ${next}`]);
        return wait;
      case 401:
        authFailed(detailText(err.detail));
        return null;
      case 422:
        showMessage("action", "error", `${what}: the server rejected the input.`, validationLines(err.detail));
        return null;
      case 429:
        showMessage("action", "warn", `${what}: too many requests. ${detailText(err.detail)}`,
          [`${next} (Retry-After: ${wait} s)`]);
        return wait;
      case 503:
        showMessage(background ? "store" : "action", "warn",
          background ? "The queue store is unavailable; retrying…" : `${what}: the queue store is unavailable.`,
          [`${detailText(err.detail)} ${next}`]);
        return wait;
      default:
        showMessage("action", "error", `${what} (HTTP ${err.status}): ${detailText(err.detail)}`);
        return err.status >= 500 ? wait : null;
    }
  }

  // ---------- token ----------

  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    } catch {
      return null;
    }
  }

  function showTokenInfo() {
    const info = $("token-info");
    const toggle = $("token-toggle");
    if (!state.token) {
      info.textContent = "No token yet. Paste one (./run.sh prints it) — it is kept in this browser only.";
      toggle.textContent = "Token";
      return;
    }
    const claims = tokenClaims(state.token);
    const who = claims && claims.sub ? String(claims.sub) : "unknown user";
    let expiry = "";
    if (claims && typeof claims.exp === "number") {
      const left = claims.exp - Date.now() / 1000;
      expiry = left > 0 ? ` · expires in ${duration(left)}` : " · expired";
    }
    info.textContent = `Using a token for ${who}${expiry}. Kept in this browser only.`;
    toggle.textContent = who;
  }

  function setTokenPanel(open) {
    $("token-panel").hidden = !open;
    $("token-toggle").setAttribute("aria-expanded", String(open));
    if (open) $("token-input").focus();
  }

  function setToken(token) {
    state.token = token || null;
    if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
    else localStorage.removeItem(TOKEN_KEY);
    showTokenInfo();
  }

  function tokenFromFragment() {
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return false;
    const params = new URLSearchParams(hash);
    const token = params.get("token");
    if (!token) return false;
    setToken(token.trim());
    history.replaceState(null, "", window.location.pathname + window.location.search);
    return true;
  }

  function authFailed(detail) {
    stopStream();
    setLive("off");
    setTokenPanel(true);
    showMessage("auth", "error", state.token ? "Your token was refused: it is invalid or has expired."
      : "A token is needed.", [
      detail ? `Server said: ${detail}` : "",
      "Paste a new token above (./run.sh prints one, or: python -m app.cli token <user>).",
    ].filter(Boolean));
  }

  // ---------- queue cards ----------

  function queueTitle(s) {
    if (s.name) return s.name;
    const first = s.images && s.images.length ? s.images[0].prompt : "";
    return first || `Queue ${s.queue_id.slice(0, 8)}`;
  }

  function createCard(q) {
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
    q.el.cancel.addEventListener("click", () => cancelQueue(q));
    q.el.retry.addEventListener("click", () => retryQueue(q));
    q.el.del.addEventListener("click", () => deleteQueue(q));
    q.el.showAll.addEventListener("click", () => {
      q.expanded = !q.expanded;
      if (q.expanded) scheduleStatus(q, 0);
      render(q);
    });
  }

  function upsertQueue(s, { place = "prepend", expanded = true } = {}) {
    let q = state.queues.get(s.queue_id);
    if (!q) {
      q = {
        id: s.queue_id, status: { ...s }, images: new Map(), tiles: new Map(), final: false, expanded,
        seq: 0, timer: null, fetching: false, dirty: false, renderQueued: false, urlsAt: 0,
      };
      delete q.status.images;
      state.queues.set(q.id, q);
      createCard(q);
    } else {
      mergeStatus(q, s, null);
    }
    if (s.images) mergeImages(q, s.images, false);
    placeCard(q, place);
    render(q);
    return q;
  }

  function placeCard(q, place) {
    const target = isFinished(q) ? $("history") : $("active");
    const from = q.el.card.parentElement;
    if (from === target) return;
    // The server's history grows or shrinks by this queue too: keep paging and the total in step.
    const shift = from === $("active") ? 1 : from === $("history") ? -1 : 0;
    state.history.total = Math.max(0, state.history.total + shift);
    state.history.offset = Math.max(0, state.history.offset + shift);
    if (place === "append") target.append(q.el.card);
    else target.prepend(q.el.card);
    updateEmpty();
  }

  function removeQueue(q) {
    clearTimeout(q.timer);
    q.el.card.remove();
    state.queues.delete(q.id);
    updateEmpty();
  }

  function updateEmpty() {
    const active = $("active").childElementCount;
    $("active-empty").hidden = active > 0;
    $("active-count").textContent = active ? String(active) : "";
    $("history-empty").hidden = $("history").childElementCount > 0;
    $("history-count").textContent = state.history.total ? String(state.history.total) : "";
  }

  // A status answer may be older than events that arrived while it was in flight: it wins only when
  // no event came in meanwhile (seqAtStart null: unknown), or when it shows at least as much progress.
  function mergeStatus(q, s, seqAtStart) {
    const fresh = q.seq === seqAtStart || advancement(s) >= advancement(q.status)
      || (s.attempt || 1) > (q.status.attempt || 1);
    if (!fresh) return false;
    const copy = { ...s };
    delete copy.images;
    q.status = { ...q.status, ...copy };
    if (!s.finished_at) q.final = false;
    return true;
  }

  function mergeImages(q, images, force) {
    for (const img of images) {
      const old = q.images.get(img.index);
      if (!force && old && IMAGE_RANK[img.status] < IMAGE_RANK[old.status] && old.attempt >= (img.attempts || 0)) {
        continue;
      }
      q.images.set(img.index, {
        index: img.index, prompt: img.prompt, seed: img.seed, status: img.status, error: img.error,
        url: img.url || (old && img.status === old.status ? old.url : null), attempt: img.attempts || 0,
      });
    }
  }

  function render(q) {
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
        tile.addEventListener("click", () => {
          const current = q.images.get(Number(tile.dataset.index));
          if (current && current.status === "succeeded" && current.url) openLightbox(q, current.index, tile);
        });
        q.tiles.set(img.index, tile);
      }
      updateTile(q, tile, img);
      const expected = prev ? prev.nextSibling : q.el.thumbs.firstChild;
      if (expected !== tile) q.el.thumbs.insertBefore(tile, expected);
      prev = tile;
    }
  }

  function updateTile(q, tile, img) {
    tile.dataset.index = String(img.index);
    tile.dataset.status = img.status;
    const label = `#${img.index}${img.prompt ? `: ${img.prompt}` : ""}`;
    tile.title = img.status === "failed" ? `${label}\nfailed: ${img.error || "unknown error"}` : label;
    tile.setAttribute("aria-label", img.status === "succeeded" ? `Open image ${label}` : `${label} (${img.status})`);
    if (img.status === "succeeded" && img.url) {
      let image = tile.querySelector("img");
      if (!image) {
        tile.replaceChildren();
        image = el("img", { loading: "lazy", decoding: "async", alt: "" });
        image.addEventListener("error", () => refreshUrls(q));
        tile.append(image);
      }
      image.alt = img.prompt || `image ${img.index}`;
      if (image.getAttribute("src") !== img.url) image.src = img.url;
    } else if (img.status === "failed") {
      tile.replaceChildren(el("span", { class: "tile-label", text: "failed" }),
        el("span", { class: "tile-error", text: img.error || "" }));
    } else {
      tile.replaceChildren(el("span", { class: "tile-label", text: "…" }));
    }
    // Not `disabled`: a failed tile keeps its tooltip and stays focusable for its error text.
    tile.setAttribute("aria-disabled", String(img.status !== "succeeded"));
  }

  // Signed image URLs expire; a broken one asks for fresh URLs, at most every URL_REFRESH_MIN_MS.
  function refreshUrls(q) {
    const now = Date.now();
    if (now - q.urlsAt < URL_REFRESH_MIN_MS) return;
    q.urlsAt = now;
    scheduleStatus(q, 0);
  }

  // ---------- status fetching (throttled per queue) ----------

  function statusDelay(q) {
    return Math.min(5000, Math.max(800, (q.status.total || 0) * 3));
  }

  function scheduleStatus(q, delay) {
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
    if (!state.queues.has(q.id) || !state.token) return;
    q.fetching = true;
    const seq = q.seq;
    try {
      const s = await api("GET", `/queue-status/${encodeURIComponent(q.id)}`);
      if (state.queues.get(q.id) !== q) return;
      if (mergeStatus(q, s, seq)) {
        if (s.finished_at) q.final = true;
      }
      mergeImages(q, s.images || [], false);
      placeCard(q, "prepend");
      render(q);
    } catch (err) {
      if (state.queues.get(q.id) !== q) return;
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

  // ---------- live events ----------

  function setLive(mode) {
    const live = $("live");
    live.dataset.state = mode;
    live.textContent = { live: "live", connecting: "connecting…", off: "offline" }[mode];
  }

  function stopStream() {
    state.streamGen += 1;
    clearTimeout(state.streamTimer);
    if (state.stream) state.stream.close();
    state.stream = null;
  }

  function retryStream(atLeastSeconds = 0) {
    clearTimeout(state.streamTimer);
    const wait = Math.max(atLeastSeconds * 1000, Math.min(STREAM_RETRY_MAX_MS, 1000 * 2 ** state.streamFailures));
    state.streamFailures += 1;
    state.streamTimer = setTimeout(openStream, wait);
  }

  async function openStream() {
    stopStream();
    if (!state.token) return;
    const gen = state.streamGen;
    setLive("connecting");
    let streamToken;
    try {
      streamToken = (await api("POST", "/stream-token")).token;
    } catch (err) {
      if (gen !== state.streamGen) return;
      const wait = reportError(err, "open the live updates", true);
      if (!(err instanceof ApiError && err.status === 401)) retryStream(wait || 0);
      return;
    }
    if (gen !== state.streamGen) return;
    // A stream token lives 5 minutes; a connection that drops later is reopened here with a new one.
    const es = new EventSource(`/events?token=${encodeURIComponent(streamToken)}`);
    state.stream = es;
    es.addEventListener("open", () => {
      setLive("live");
      if (state.streamOpened) refreshActive();
      state.streamOpened = true;
      state.streamFailures = 0;
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
    es.addEventListener("error", () => {
      if (gen !== state.streamGen) return;
      if (es.readyState === EventSource.CLOSED) {
        state.stream = null;
        setLive("off");
        retryStream();
      } else {
        setLive("connecting");
      }
    });
  }

  function onEvent(ev) {
    if (!ev || !ev.queue_id) return;
    let q = state.queues.get(ev.queue_id);
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
      });
    }
    if (ev.type === "queue" && ev.retried) {
      q.final = false;
      s.finished_at = null;
      for (const [index, img] of q.images) {
        if (img.status !== "succeeded") q.images.delete(index);
      }
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

  // ---------- loading lists ----------

  function scheduleRefresh(seconds) {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(() => {
      refreshActive();
      if (!state.history.offset) loadHistory(true);
    }, seconds * 1000);
  }

  async function refreshActive() {
    if (!state.token) return;
    let page;
    try {
      page = await api("GET", "/active-queues");
    } catch (err) {
      const wait = reportError(err, "load the active queues", true);
      if (wait) scheduleRefresh(wait);
      return;
    }
    const seen = new Set();
    for (const s of [...page.queues].reverse()) {
      seen.add(s.queue_id);
      const q = upsertQueue(s);
      scheduleStatus(q, 0);
    }
    // Queues shown as running that the server no longer lists have finished meanwhile.
    for (const q of state.queues.values()) {
      if (!seen.has(q.id) && !isFinished(q)) scheduleStatus(q, 0);
    }
    updateEmpty();
  }

  async function loadHistory(reset) {
    if (!state.token || state.history.loading) return;
    const h = state.history;
    if (reset) {
      h.offset = 0;
      for (const q of [...state.queues.values()]) {
        if (isFinished(q)) removeQueue(q);
      }
    }
    const params = new URLSearchParams({ limit: String(HISTORY_PAGE), offset: String(h.offset) });
    if (h.search) params.set("search", h.search);
    if (h.status) params.set("status", h.status);
    h.loading = true;
    $("history-more").disabled = true;
    try {
      const page = await api("GET", `/history?${params}`);
      for (const s of page.queues) {
        const known = state.queues.get(s.queue_id);
        const q = upsertQueue(s, { place: "append", expanded: known ? known.expanded : false });
        q.collapsible = true;
        q.final = true;
        render(q);
      }
      h.offset += page.queues.length;
      h.total = page.total;
    } catch (err) {
      const wait = reportError(err, "load the history", true);
      if (wait) scheduleRefresh(wait);
    } finally {
      h.loading = false;
      $("history-more").disabled = false;
      $("history-more").hidden = h.offset >= h.total;
      updateEmpty();
    }
  }

  async function loadModels() {
    try {
      const data = await api("GET", "/models");
      const select = $("create-form").elements.model;
      select.replaceChildren(el("option", { value: "", text: `default (${data.default})` }));
      for (const m of data.models || []) {
        select.append(el("option", { value: m.name, text: `${m.name} · ${m.provider}` }));
      }
    } catch {
      // Optional: the form works with the default model.
    }
  }

  // ---------- actions ----------

  async function withButton(button, busyText, action) {
    const text = button.textContent;
    button.disabled = true;
    button.textContent = busyText;
    try {
      await action();
    } finally {
      button.disabled = false;
      button.textContent = text;
    }
  }

  function cancelQueue(q) {
    return withButton(q.el.cancel, "Cancelling…", async () => {
      try {
        const s = await api("POST", `/cancel-queue/${encodeURIComponent(q.id)}`);
        if (state.queues.get(q.id) !== q) return;
        q.seq += 1;
        mergeStatus(q, s, q.seq);
        if (s.finished_at) q.final = true;
        placeCard(q, "prepend");
        render(q);
        scheduleStatus(q, 0);
      } catch (err) {
        if (err instanceof ApiError && err.status === 409) {
          showMessage("action", "info", `This queue has already finished: ${detailText(err.detail)}`, [], 6000);
          scheduleStatus(q, 0);
        } else {
          reportError(err, "cancel the queue");
        }
      }
    });
  }

  function retryQueue(q) {
    return withButton(q.el.retry, "Retrying…", async () => {
      try {
        const s = await api("POST", `/retry-queue/${encodeURIComponent(q.id)}`, { body: { include_cancelled: true } });
        if (state.queues.get(q.id) !== q) return;
        q.seq += 1;
        q.final = false;
        q.expanded = true;
        for (const [index, img] of q.images) {
          if (img.status !== "succeeded") q.images.delete(index);
        }
        mergeStatus(q, s, q.seq);
        placeCard(q, "prepend");
        render(q);
        scheduleStatus(q, 0);
      } catch (err) {
        reportError(err, "retry the queue");
      }
    });
  }

  function deleteQueue(q) {
    const button = q.el.del;
    if (button.dataset.confirm !== "yes") {
      button.dataset.confirm = "yes";
      button.textContent = "Really delete?";
      button.classList.add("danger");
      setTimeout(() => {
        delete button.dataset.confirm;
        button.textContent = "Delete";
        button.classList.remove("danger");
      }, 4000);
      return undefined;
    }
    return withButton(button, "Deleting…", async () => {
      try {
        await api("DELETE", `/queue/${encodeURIComponent(q.id)}`);
        removeQueue(q);
        state.history.total = Math.max(0, state.history.total - 1);
        state.history.offset = Math.max(0, state.history.offset - 1);
        updateEmpty();
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) removeQueue(q);
        else reportError(err, "delete the queue");
      }
    });
  }

  // ---------- the create form ----------

  function formMode() {
    return $("create-form").elements.mode.value;
  }

  function parseVariables(text) {
    const variables = {};
    const problems = [];
    text.split("\n").forEach((raw, i) => {
      const line = raw.trim();
      if (!line) return;
      const match = /^([^=:]+)[=:](.*)$/.exec(line);
      if (!match) {
        problems.push(`variables line ${i + 1}: write it as name = value, value`);
        return;
      }
      const name = match[1].trim().replace(/^\{|\}$/g, "");
      const values = match[2].split(",").map((v) => v.trim()).filter(Boolean);
      variables[name] = values;
    });
    return { variables, problems };
  }

  function numberField(value) {
    const v = String(value).trim();
    return v === "" ? undefined : Number(v);
  }

  function buildBody() {
    const f = $("create-form").elements;
    const body = { priority: f.priority.value };
    const problems = [];
    if (formMode() === "template") {
      body.prompt = f.prompt.value;
      const { variables, problems: bad } = parseVariables(f.variables.value);
      problems.push(...bad);
      if (Object.keys(variables).length) body.variables = variables;
    } else {
      body.prompts = f.prompts.value.split("\n").map((line) => line.trim()).filter(Boolean);
    }
    for (const key of ["count", "width", "height", "seed"]) {
      const n = numberField(f[key].value);
      if (n !== undefined) body[key] = n;
    }
    const name = f.name.value.trim();
    if (name) body.name = name;
    const negative = f.negative_prompt.value.trim();
    if (negative) body.negative_prompt = negative;
    const tags = f.tags.value.split(",").map((t) => t.trim()).filter(Boolean);
    if (tags.length) body.tags = tags;
    if (f.model.value) body.model = f.model.value;
    return { body, problems };
  }

  function estimate() {
    const { body } = buildBody();
    let prompts = 0;
    if (body.prompts) prompts = body.prompts.length;
    else if (body.prompt) {
      prompts = Object.values(body.variables || {}).reduce((n, values) => n * values.length, 1);
    }
    const count = body.count || 1;
    $("estimate").textContent = prompts ? `${plural(prompts, "prompt")} × ${count} = ${plural(prompts * count, "image")}` : "";
  }

  function showFormErrors(lines, detail) {
    const box = $("form-errors");
    const f = $("create-form").elements;
    for (const name of FORM_FIELDS) f[name].removeAttribute("aria-invalid");
    if (!lines.length) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    box.replaceChildren(el("strong", { text: "Please fix:" }), el("ul", {}, ...lines.map((l) => el("li", { text: l }))));
    box.hidden = false;
    if (Array.isArray(detail)) {
      for (const item of detail) {
        const field = Array.isArray(item.loc) && item.loc[0] === "body" ? item.loc[1] : null;
        if (field && FORM_FIELDS.includes(field)) f[field].setAttribute("aria-invalid", "true");
      }
    }
  }

  async function submitCreate(event) {
    event.preventDefault();
    if (state.creating) return;
    if (!state.token) {
      authFailed("");
      return;
    }
    const { body, problems } = buildBody();
    if (problems.length) {
      showFormErrors(problems);
      return;
    }
    // One key per form content: a double submit or a retry after a lost answer replays the same queue.
    if (!state.createKey) state.createKey = newKey();
    state.creating = true;
    updateSubmit();
    try {
      const s = await api("POST", "/create-queue", { body, headers: { "Idempotency-Key": state.createKey } });
      state.createKey = null;
      showFormErrors([]);
      clearMessage("action");
      const q = upsertQueue(s, { place: "prepend", expanded: true });
      scheduleStatus(q, 0);
      showMessage("action", "ok", `Queue created: ${plural(s.total, "image")}.`, [], 4000);
      q.el.card.scrollIntoView({ block: "nearest", behavior: "smooth" });
    } catch (err) {
      if (err instanceof ApiError && err.status === 422) {
        showFormErrors(validationLines(err.detail), err.detail);
      } else {
        showFormErrors([]);
        const wait = reportError(err, "create the queue");
        if (err instanceof ApiError && err.status === 429 && wait) holdSubmit(wait);
      }
    } finally {
      state.creating = false;
      updateSubmit();
    }
  }

  // Past an admission limit (429) the button waits out Retry-After, counting down.
  function holdSubmit(seconds) {
    state.holdUntil = Date.now() + seconds * 1000;
    clearInterval(state.holdTimer);
    state.holdTimer = setInterval(updateSubmit, 1000);
    updateSubmit();
  }

  function updateSubmit() {
    const button = $("submit");
    const left = Math.ceil((state.holdUntil - Date.now()) / 1000);
    if (left <= 0) clearInterval(state.holdTimer);
    button.disabled = state.creating || left > 0;
    button.textContent = state.creating ? "Creating…" : left > 0 ? `Wait ${left} s` : "Create queue";
  }

  function switchMode() {
    const template = formMode() === "template";
    $("template-fields").hidden = !template;
    $("prompts-fields").hidden = template;
    estimate();
  }

  // ---------- lightbox ----------

  function lightboxImages(q) {
    return [...q.images.values()].filter((img) => img.status === "succeeded" && img.url).sort((a, b) => a.index - b.index);
  }

  function openLightbox(q, index, returnFocus) {
    state.lightbox = { q, index, returnFocus };
    showLightbox();
    $("lightbox").hidden = false;
    document.body.classList.add("no-scroll");
    $("lightbox-close").focus();
  }

  function showLightbox() {
    const { q, index } = state.lightbox;
    const img = q.images.get(index);
    if (!img) return;
    $("lightbox-img").src = img.url;
    $("lightbox-img").alt = img.prompt || `image ${index}`;
    $("lightbox-open").href = img.url;
    const parts = [`#${index}`];
    if (img.seed !== null && img.seed !== undefined) parts.push(`seed ${img.seed}`);
    $("lightbox-caption").textContent = `${parts.join(" · ")}${img.prompt ? ` — ${img.prompt}` : ""}`;
    const many = lightboxImages(q).length > 1;
    $("lightbox-prev").hidden = !many;
    $("lightbox-next").hidden = !many;
  }

  function stepLightbox(delta) {
    if (!state.lightbox) return;
    const list = lightboxImages(state.lightbox.q);
    if (!list.length) return;
    const at = list.findIndex((img) => img.index === state.lightbox.index);
    const next = list[(at + delta + list.length) % list.length];
    state.lightbox.index = next.index;
    showLightbox();
  }

  function closeLightbox() {
    if (!state.lightbox) return;
    const back = state.lightbox.returnFocus;
    state.lightbox = null;
    $("lightbox").hidden = true;
    $("lightbox-img").removeAttribute("src");
    document.body.classList.remove("no-scroll");
    if (back && back.isConnected) back.focus();
  }

  // ---------- start ----------

  function resetView() {
    stopStream();
    state.streamOpened = false;
    state.streamFailures = 0;
    for (const q of [...state.queues.values()]) removeQueue(q);
    state.history = { ...state.history, offset: 0, total: 0 };
    updateEmpty();
  }

  function start() {
    resetView();
    showTokenInfo();
    if (!state.token) {
      setLive("off");
      setTokenPanel(true);
      showMessage("auth", "info", "Paste a token to start.", ["./run.sh prints one (or open the URL it prints)."]);
      return;
    }
    clearMessage("auth");
    loadModels();
    refreshActive();
    loadHistory(true);
    openStream();
  }

  function bind() {
    $("token-toggle").addEventListener("click", () => setTokenPanel($("token-panel").hidden));
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
      if (!value) return;
      setToken(value);
      $("token-input").value = "";
      setTokenPanel(false);
      start();
    });
    $("token-forget").addEventListener("click", () => {
      setToken(null);
      start();
    });
    window.addEventListener("hashchange", () => {
      if (tokenFromFragment()) start();
    });

    const form = $("create-form");
    form.addEventListener("submit", submitCreate);
    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("input", (event) => {
      state.createKey = null;
      if (event.target.removeAttribute) event.target.removeAttribute("aria-invalid");
      estimate();
    });
    form.addEventListener("change", (event) => {
      if (event.target.name === "mode") switchMode();
    });

    let searchTimer = null;
    const search = $("history-search");
    const onSearch = () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        state.history.search = search.elements.search.value.trim();
        state.history.status = search.elements.status.value;
        loadHistory(true);
      }, 300);
    };
    search.addEventListener("input", onSearch);
    search.addEventListener("submit", (event) => {
      event.preventDefault();
      onSearch();
    });
    $("history-more").addEventListener("click", () => loadHistory(false));

    $("lightbox-img").addEventListener("load", (event) => {
      const img = event.target;
      if (img.naturalWidth && img.naturalHeight) img.style.setProperty("--ratio", String(img.naturalWidth / img.naturalHeight));
    });
    $("lightbox-close").addEventListener("click", closeLightbox);
    $("lightbox-prev").addEventListener("click", () => stepLightbox(-1));
    $("lightbox-next").addEventListener("click", () => stepLightbox(1));
    $("lightbox").addEventListener("click", (event) => {
      if (event.target === $("lightbox") || event.target.tagName === "FIGURE") closeLightbox();
    });
    document.addEventListener("keydown", (event) => {
      if (!state.lightbox) return;
      if (event.key === "Escape") closeLightbox();
      else if (event.key === "ArrowLeft") stepLightbox(-1);
      else if (event.key === "ArrowRight") stepLightbox(1);
    });
  }

  function init() {
    bind();
    if (!tokenFromFragment()) state.token = localStorage.getItem(TOKEN_KEY);
    switchMode();
    start();
  }

  init();
})();
