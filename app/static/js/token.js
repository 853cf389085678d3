// The JWT: kept in localStorage, taken from the #token= fragment, shown and edited in the token panel.

import { $ } from "./dom.js";
import { duration } from "./format.js";

const TOKEN_KEY = "imagequeue.token";

let token = null;

export function currentToken() {
  return token;
}

function tokenClaims(value) {
  try {
    const part = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

export function showTokenInfo() {
  const info = $("token-info");
  const toggle = $("token-toggle");
  if (!token) {
    info.textContent = "No token yet. Paste one (./run.sh prints it) — it is kept in this browser only.";
    toggle.textContent = "Token";
    return;
  }
  const claims = tokenClaims(token);
  const who = claims && claims.sub ? String(claims.sub) : "unknown user";
  let expiry = "";
  if (claims && typeof claims.exp === "number") {
    const left = claims.exp - Date.now() / 1000;
    expiry = left > 0 ? ` · expires in ${duration(left)}` : " · expired";
  }
  info.textContent = `Using a token for ${who}${expiry}. Kept in this browser only.`;
  toggle.textContent = who;
}

export function setTokenPanel(open) {
  $("token-panel").hidden = !open;
  $("token-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("token-input").focus();
}

function setToken(value) {
  token = value || null;
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  showTokenInfo();
}

// A token in the address (the link ./run.sh prints) is stored, then removed from the address bar.
function tokenFromFragment() {
  const hash = window.location.hash.replace(/^#/, "");
  if (!hash) return false;
  const params = new URLSearchParams(hash);
  const value = params.get("token");
  if (!value) return false;
  setToken(value.trim());
  window.history.replaceState(null, "", window.location.pathname + window.location.search);
  return true;
}

export function loadToken() {
  if (!tokenFromFragment()) token = localStorage.getItem(TOKEN_KEY);
}

// `changed` runs whenever the person saves, forgets or links in a token.
export function bindTokenPanel(changed) {
  $("token-toggle").addEventListener("click", () => setTokenPanel($("token-panel").hidden));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
    if (!value) return;
    setToken(value);
    $("token-input").value = "";
    setTokenPanel(false);
    changed();
  });
  $("token-forget").addEventListener("click", () => {
    setToken(null);
    changed();
  });
  window.addEventListener("hashchange", () => {
    if (tokenFromFragment()) changed();
  });
}
