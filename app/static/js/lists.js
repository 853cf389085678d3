// Loading the Active and History lists from the server, with History's search, filter and paging.

import { getIfChanged, reportError } from "./api.js";
import { render } from "./cards.js";
import { $ } from "./dom.js";
import { isFinished } from "./model.js";
import { scheduleStatus } from "./polling.js";
import { historyPage, queues, removeQueue, updateEmpty, upsertQueue } from "./queues.js";
import { currentToken } from "./token.js";

const HISTORY_PAGE = 20;
const SEARCH_DEBOUNCE_MS = 300;

const historyQuery = { loading: false, search: "", status: "" };
let refreshTimer = null;
// The last answers, for conditional requests: on a 304 the same answer is used again.
let lastActive = null;
let lastHistory = null;

function scheduleRefresh(seconds) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    refreshActive();
    if (!historyPage.offset) loadHistory(true);
  }, seconds * 1000);
}

export async function refreshActive() {
  if (!currentToken()) return;
  let page;
  try {
    lastActive = await getIfChanged("/active-queues", lastActive);
    page = lastActive.data;
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
  for (const q of queues.values()) {
    if (!seen.has(q.id) && !isFinished(q)) scheduleStatus(q, 0);
  }
  updateEmpty();
}

export async function loadHistory(reset) {
  if (!currentToken() || historyQuery.loading) return;
  if (reset) {
    historyPage.offset = 0;
    for (const q of [...queues.values()]) {
      if (isFinished(q)) removeQueue(q);
    }
  }
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE), offset: String(historyPage.offset) });
  if (historyQuery.search) params.set("search", historyQuery.search);
  if (historyQuery.status) params.set("status", historyQuery.status);
  historyQuery.loading = true;
  $("history-more").disabled = true;
  try {
    lastHistory = await getIfChanged(`/history?${params}`, lastHistory);
    const page = lastHistory.data;
    for (const s of page.queues) {
      const known = queues.get(s.queue_id);
      const q = upsertQueue(s, { place: "append", expanded: known ? known.expanded : false });
      q.collapsible = true;
      q.final = true;
      render(q);
    }
    historyPage.offset += page.queues.length;
    historyPage.total = page.total;
  } catch (err) {
    const wait = reportError(err, "load the history", true);
    if (wait) scheduleRefresh(wait);
  } finally {
    historyQuery.loading = false;
    $("history-more").disabled = false;
    $("history-more").hidden = historyPage.offset >= historyPage.total;
    updateEmpty();
  }
}

export function bindHistory() {
  let searchTimer = null;
  const search = $("history-search");
  const onSearch = () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      historyQuery.search = search.elements.search.value.trim();
      historyQuery.status = search.elements.status.value;
      loadHistory(true);
    }, SEARCH_DEBOUNCE_MS);
  };
  search.addEventListener("input", onSearch);
  search.addEventListener("submit", (event) => {
    event.preventDefault();
    onSearch();
  });
  $("history-more").addEventListener("click", () => loadHistory(false));
}
