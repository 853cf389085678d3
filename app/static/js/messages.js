// The message strip under the top bar: one message per key, a new one replacing the old.

import { $, el } from "./dom.js";

const messages = new Map();

export function showMessage(key, kind, title, lines = [], timeoutMs = 0) {
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

export function clearMessage(key) {
  const entry = messages.get(key);
  if (!entry) return;
  clearTimeout(entry.timer);
  entry.box.remove();
  messages.delete(key);
}
