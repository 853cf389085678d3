// Talking to the API: JSON over fetch with the bearer token, and errors explained to the person.

import { duration } from "./format.js";
import { clearMessage, showMessage } from "./messages.js";
import { currentToken } from "./token.js";

const REQUEST_TIMEOUT_MS = 20000;

export class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

// Sends one request and reads its JSON (or text, or null when empty). Throws an ApiError unless the
// status is 2xx, or 304 to a request that asked If-None-Match.
async function request(method, path, { body, headers } = {}) {
  const h = { Accept: "application/json", ...(headers || {}) };
  const token = currentToken();
  if (token) h.Authorization = `Bearer ${token}`;
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
  if (!res.ok && !(res.status === 304 && "If-None-Match" in h)) {
    const detail = data && typeof data === "object" && "detail" in data ? data.detail : (text || res.statusText);
    const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
    throw new ApiError(res.status, detail, Number.isFinite(retry) ? retry : null);
  }
  clearMessage("network");
  clearMessage("store");
  return { res, data };
}

export async function api(method, path, options) {
  return (await request(method, path, options)).data;
}

// A GET for something polled. `last` is what this returned before (or null): when it was for the
// same path and token and came with an ETag, the server is asked If-None-Match, and its 304 ("not
// changed") gives `last` back, to be used as if the same answer had come again. A server that sends
// no ETag is simply asked in full each time. Returns { path, token, etag, data }.
export async function getIfChanged(path, last) {
  const token = currentToken();
  const known = last && last.etag && last.path === path && last.token === token ? last : null;
  const { res, data } = await request("GET", path, { headers: known ? { "If-None-Match": known.etag } : {} });
  if (res.status === 304) return known;
  return { path, token, etag: res.headers.get("ETag"), data };
}

// What a missing or refused token means for the page is decided where the page is put together.
let authFailureHandler = () => {};

export function onAuthFailure(handler) {
  authFailureHandler = handler;
}

export function authFailed(detail) {
  authFailureHandler(detail);
}

export function validationLines(detail) {
  if (!Array.isArray(detail)) return [String(detail)];
  return detail.map((item) => {
    const loc = Array.isArray(item.loc) ? item.loc.filter((part, i) => !(i === 0 && part === "body")) : [];
    const where = loc.length ? `${loc.join(" › ")}: ` : "";
    return `${where}${item.msg || JSON.stringify(item)}`;
  });
}

export function detailText(detail) {
  if (typeof detail === "string") return detail;
  return validationLines(detail).join("; ");
}

// Tells the person what went wrong and what happens next; returns seconds until a retry makes sense.
// Background loads retry by themselves; actions (create, cancel, ...) are left to the person.
export function reportError(err, doing, background = false) {
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
