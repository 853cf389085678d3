// The New batch form: prompts or a template with variables, its estimate, and POST /create-queue.

import { ApiError, api, authFailed, reportError, validationLines } from "./api.js";
import { $, el } from "./dom.js";
import { plural } from "./format.js";
import { clearMessage, showMessage } from "./messages.js";
import { scheduleStatus } from "./polling.js";
import { upsertQueue } from "./queues.js";
import { currentToken } from "./token.js";

const FORM_FIELDS = ["prompts", "prompt", "variables", "count", "width", "height", "seed", "priority", "name",
  "negative_prompt", "tags", "model"];

const submit = { createKey: null, creating: false, holdUntil: 0, holdTimer: null };

function newKey() {
  if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

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
  if (submit.creating) return;
  if (!currentToken()) {
    authFailed("");
    return;
  }
  const { body, problems } = buildBody();
  if (problems.length) {
    showFormErrors(problems);
    return;
  }
  // One key per form content: a double submit or a retry after a lost answer replays the same queue.
  if (!submit.createKey) submit.createKey = newKey();
  submit.creating = true;
  updateSubmit();
  try {
    const s = await api("POST", "/create-queue", { body, headers: { "Idempotency-Key": submit.createKey } });
    submit.createKey = null;
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
    submit.creating = false;
    updateSubmit();
  }
}

// Past an admission limit (429) the button waits out Retry-After, counting down.
function holdSubmit(seconds) {
  submit.holdUntil = Date.now() + seconds * 1000;
  clearInterval(submit.holdTimer);
  submit.holdTimer = setInterval(updateSubmit, 1000);
  updateSubmit();
}

function updateSubmit() {
  const button = $("submit");
  const left = Math.ceil((submit.holdUntil - Date.now()) / 1000);
  if (left <= 0) clearInterval(submit.holdTimer);
  button.disabled = submit.creating || left > 0;
  button.textContent = submit.creating ? "Creating…" : left > 0 ? `Wait ${left} s` : "Create queue";
}

export function switchMode() {
  const template = formMode() === "template";
  $("template-fields").hidden = !template;
  $("prompts-fields").hidden = template;
  estimate();
}

export async function loadModels() {
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

export function bindForm() {
  const form = $("create-form");
  form.addEventListener("submit", submitCreate);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("input", (event) => {
    submit.createKey = null;
    if (event.target.removeAttribute) event.target.removeAttribute("aria-invalid");
    estimate();
  });
  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") switchMode();
  });
}
