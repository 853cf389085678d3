// What a card's buttons and tiles do: cancel, retry, delete, show all, open an image large.

import { ApiError, api, detailText, reportError } from "./api.js";
import { render } from "./cards.js";
import { $ } from "./dom.js";
import { openLightbox } from "./lightbox.js";
import { showMessage } from "./messages.js";
import { forgetUnfinishedImages, mergeStatus } from "./model.js";
import { refreshUrls, scheduleStatus } from "./polling.js";
import { isShown, placeCard, queues, removeQueue, shiftHistory, updateEmpty } from "./queues.js";

const DELETE_CONFIRM_MS = 4000;

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
      if (!isShown(q)) return;
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
      if (!isShown(q)) return;
      q.seq += 1;
      q.final = false;
      q.expanded = true;
      forgetUnfinishedImages(q);
      mergeStatus(q, s, q.seq);
      placeCard(q, "prepend");
      render(q);
      scheduleStatus(q, 0);
    } catch (err) {
      reportError(err, "retry the queue");
    }
  });
}

// The first press asks for a second one within DELETE_CONFIRM_MS.
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
    }, DELETE_CONFIRM_MS);
    return undefined;
  }
  return withButton(button, "Deleting…", async () => {
    try {
      await api("DELETE", `/queue/${encodeURIComponent(q.id)}`);
      removeQueue(q);
      shiftHistory(-1);
      updateEmpty();
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) removeQueue(q);
      else reportError(err, "delete the queue");
    }
  });
}

function toggleAll(q) {
  q.expanded = !q.expanded;
  if (q.expanded) scheduleStatus(q, 0);
  render(q);
}

function openTile(q, tile) {
  const current = q.images.get(Number(tile.dataset.index));
  if (current && current.status === "succeeded" && current.url) openLightbox(q, current.index, tile);
}

function cardOf(target) {
  const card = target.closest(".card");
  return card ? queues.get(card.dataset.queueId) : undefined;
}

// One listener per list, for every card in it now or later.
export function bindCards() {
  for (const list of [$("active"), $("history")]) {
    list.addEventListener("click", (event) => {
      const q = cardOf(event.target);
      if (!q) return;
      const e = q.el;
      const button = event.target.closest("button");
      if (button === e.cancel) cancelQueue(q);
      else if (button === e.retry) retryQueue(q);
      else if (button === e.del) deleteQueue(q);
      else if (button === e.showAll) toggleAll(q);
      else if (button && button.classList.contains("tile")) openTile(q, button);
    });
    // Load errors do not bubble; a capturing listener still sees a tile's image fail.
    list.addEventListener("error", (event) => {
      const q = event.target.tagName === "IMG" ? cardOf(event.target) : undefined;
      if (q) refreshUrls(q);
    }, true);
  }
}
