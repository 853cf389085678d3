// The queues on the page, by id, and which list each card sits in: Active while it runs, History
// once it has finished.

import { createCard, render } from "./cards.js";
import { $ } from "./dom.js";
import { isFinished, mergeImages, mergeStatus, newQueue } from "./model.js";

export const queues = new Map();

// How far the History list has been paged through, and the server's count of finished queues.
export const historyPage = { offset: 0, total: 0 };

// False once the queue has left the page (deleted, or the view was reset) while a request was out.
export function isShown(q) {
  return queues.get(q.id) === q;
}

export function upsertQueue(s, { place = "prepend", expanded = true } = {}) {
  let q = queues.get(s.queue_id);
  if (!q) {
    q = newQueue(s, expanded);
    queues.set(q.id, q);
    createCard(q);
  } else {
    mergeStatus(q, s, null);
  }
  if (s.images) mergeImages(q, s.images, false);
  placeCard(q, place);
  render(q);
  return q;
}

export function placeCard(q, place) {
  const target = isFinished(q) ? $("history") : $("active");
  const from = q.el.card.parentElement;
  if (from === target) return;
  // The server's history grows or shrinks by this queue too: keep paging and the total in step.
  shiftHistory(from === $("active") ? 1 : from === $("history") ? -1 : 0);
  if (place === "append") target.append(q.el.card);
  else target.prepend(q.el.card);
  updateEmpty();
}

export function shiftHistory(by) {
  historyPage.total = Math.max(0, historyPage.total + by);
  historyPage.offset = Math.max(0, historyPage.offset + by);
}

export function removeQueue(q) {
  clearTimeout(q.timer);
  q.el.card.remove();
  queues.delete(q.id);
  updateEmpty();
}

export function removeAllQueues() {
  for (const q of [...queues.values()]) removeQueue(q);
  historyPage.offset = 0;
  historyPage.total = 0;
  updateEmpty();
}

export function updateEmpty() {
  const active = $("active").childElementCount;
  $("active-empty").hidden = active > 0;
  $("active-count").textContent = active ? String(active) : "";
  $("history-empty").hidden = $("history").childElementCount > 0;
  $("history-count").textContent = historyPage.total ? String(historyPage.total) : "";
}
