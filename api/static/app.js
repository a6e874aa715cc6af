// sd3serve playground: submit a prompt over the REST API, follow the job, show the image.
// Plain browser JavaScript, no build step. Paths are relative to this page, so the page works
// wherever the API is mounted.
"use strict";

const KEY_STORAGE = "sd3serve.apiKey";
const RECENT_STORAGE = "sd3serve.recent";
const RECENT_MAX = 12;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const FIELDS = ["negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "cache_interval", "n",
  "output_format"];
const NUMBERS = new Set(["width", "height", "steps", "guidance_scale", "seed", "cache_interval", "n"]);

const $ = (id) => document.getElementById(id);
let currentToken = 0; // bumped for every submission; an older tracking loop stops when it changes
let currentJobId = null;

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    const detail = error.message || (body && typeof body.detail === "string" ? body.detail : "") || `HTTP ${status}`;
    super(error.field && !detail.startsWith(error.field) ? `${error.field}: ${detail}` : detail);
    this.status = status;
  }
}

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, body);
  }
  return body;
}

// Defaults and ranges come from the server's OpenAPI schema, so the form matches its limits.
async function loadLimits() {
  try {
    const spec = await fetch("openapi.json").then((r) => r.json());
    const props = spec.components.schemas.JobRequest.properties;
    for (const name of FIELDS) {
      const input = $(name);
      const schema = props[name];
      if (!input || !schema) continue;
      if (schema.default !== undefined && schema.default !== null && name !== "seed") input.value = schema.default;
      for (const [attr, key] of [["min", "minimum"], ["max", "maximum"], ["step", "multipleOf"]]) {
        if (schema[key] !== undefined) input.setAttribute(attr, schema[key]);
      }
      if (schema.description) input.title = schema.description;
    }
  } catch (_) {
    // No schema: the server's own defaults apply to empty fields.
  }
}

function formBody() {
  const body = { prompt: $("prompt").value.trim() };
  for (const name of FIELDS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    body[name] = NUMBERS.has(name) ? Number(raw) : raw;
  }
  return body;
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
  $("current").dataset.status = kind;
}

function describe(job) {
  const p = job.progress || { step: 0, total: 0 };
  switch (job.status) {
    case "queued":
      return job.queue_position != null ? `Queued (${job.queue_position} ahead)` : "Queued";
    case "running":
      return p.total ? `Running: step ${p.step} of ${p.total}` : "Running";
    case "succeeded": {
      const seconds = job.timings && job.timings.total_seconds;
      return `Done${seconds != null ? ` in ${Number(seconds).toFixed(1)} s` : ""} (seed ${job.seed})`;
    }
    case "failed":
      return `Failed: ${job.error ? job.error.message : "unknown error"}`;
    case "canceled":
      return "Canceled";
    default:
      return job.status;
  }
}

function showProgress(job) {
  const bar = $("progress");
  const p = job.progress || { step: 0, total: 0 };
  bar.hidden = TERMINAL.has(job.status);
  bar.max = Math.max(p.total, 1);
  bar.value = job.status === "queued" ? 0 : p.step;
}

// The URL an <img> can load. Presigned storage URLs (another origin) need no key; the API's own
// image endpoint may, and an <img> cannot send headers, so that one is fetched into a blob.
async function imageSource(job, index = 0) {
  const given = (job.images && job.images[index]) || (index === 0 && job.image_url);
  const url = new URL(given || `v1/jobs/${job.id}/image?index=${index}`, document.baseURI);
  if (url.origin !== window.location.origin) return url.href;
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return URL.createObjectURL(await response.blob());
}

async function showResult(job) {
  const image = $("result-image");
  image.src = await imageSource(job);
  image.alt = job.request ? job.request.prompt : "";
  image.dataset.jobId = job.id;
  // A job of n images: the first above, the others (seeds seed+1 ... seed+n-1) beside it.
  const more = $("result-more");
  more.replaceChildren();
  const count = (job.images || []).length;
  for (let i = 1; i < count; i++) {
    const extra = document.createElement("img");
    extra.src = await imageSource(job, i);
    extra.alt = `${image.alt} (seed ${job.seed + i})`;
    more.append(extra);
  }
  const r = job.request || {};
  const seeds = count > 1 ? `seeds ${job.seed}–${job.seed + count - 1}` : `seed ${job.seed}`;
  $("result-caption").textContent =
    `${r.prompt || ""} · ${r.width}×${r.height} · ${r.steps} steps · ${job.output_format || "png"} · ${seeds}`;
  $("result").hidden = false;
}

// Follow a job through its server-sent event stream (GET v1/jobs/{id}/events). fetch, not
// EventSource, so the API key can go in a header. Calls onJob with the job as it changes and
// returns the final job; throws if the stream breaks before the job ends.
async function streamJob(job, token, onJob) {
  const response = await fetch(`v1/jobs/${encodeURIComponent(job.id)}/events`, {
    headers: { Accept: "text/event-stream", ...authHeaders() },
  });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (token === currentToken) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trim());
        } // lines starting with ":" are heartbeats
        if (!data.length) continue;
        const payload = JSON.parse(data.join("\n"));
        if (name === "queued") job = { ...job, status: "queued", queue_position: payload.queue_position };
        else if (name === "running") job = { ...job, status: "running", progress: { step: payload.step, total: payload.total } };
        else if (TERMINAL.has(name)) job = payload;
        else continue;
        onJob(job);
        if (TERMINAL.has(job.status)) return job;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  if (token === currentToken) throw new Error("the event stream ended early");
  return job;
}

async function follow(job, token) {
  currentJobId = job.id;
  $("current").dataset.jobId = job.id;
  $("cancel").hidden = false;
  const show = (j) => {
    setStatus(describe(j), j.status);
    showProgress(j);
  };
  while (token === currentToken) {
    show(job);
    if (TERMINAL.has(job.status)) break;
    try {
      job = await streamJob(job, token, show);
    } catch (err) {
      if (err.status && err.status < 500) throw err;
      // The stream broke (server restarting, a proxy gave up): look once (?wait= long poll), then stream again.
      await new Promise((resolve) => setTimeout(resolve, 1000));
      try {
        job = await api(`v1/jobs/${encodeURIComponent(job.id)}?wait=1`);
      } catch (again) {
        if (again.status && again.status < 500) throw again;
      }
    }
  }
  if (token !== currentToken) return;
  $("cancel").hidden = true;
  if (job.status === "succeeded") {
    await showResult(job);
    remember(job);
    setStatus(describe(job), "succeeded");
  }
}

async function submit(event) {
  event.preventDefault();
  const token = ++currentToken;
  const button = $("submit");
  button.disabled = true;
  $("result").hidden = true;
  setStatus("Submitting…", "submitting");
  try {
    const job = await api("v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(formBody()),
    });
    button.disabled = false;
    await follow(job, token);
  } catch (err) {
    if (token !== currentToken) return;
    $("cancel").hidden = true;
    $("progress").hidden = true;
    const hint = err.status === 401 || err.status === 403 ? " — set the API key below." : "";
    if (hint) $("key-box").open = true;
    setStatus(`Error: ${err.message}${hint}`, "error");
  } finally {
    if (token === currentToken) button.disabled = false;
  }
}

async function cancel() {
  if (!currentJobId) return;
  try {
    await api(`v1/jobs/${encodeURIComponent(currentJobId)}/cancel`, { method: "POST" });
  } catch (err) {
    setStatus(`Cancel failed: ${err.message}`, "error");
  }
}

// Recent results: job ids kept in local storage; thumbnails are re-fetched through the API,
// so presigned URLs are always fresh, and jobs the server has forgotten drop out.
function recentJobs() {
  try {
    return JSON.parse(localStorage.getItem(RECENT_STORAGE) || "[]");
  } catch (_) {
    return [];
  }
}

function saveRecent(list) {
  localStorage.setItem(RECENT_STORAGE, JSON.stringify(list.slice(0, RECENT_MAX)));
}

function remember(job) {
  const entry = { id: job.id, prompt: (job.request || {}).prompt || "", seed: job.seed };
  saveRecent([entry, ...recentJobs().filter((j) => j.id !== job.id)]);
  renderRecent();
}

async function renderRecent() {
  const list = $("recent");
  list.replaceChildren();
  for (const entry of recentJobs()) {
    const item = document.createElement("li");
    item.dataset.jobId = entry.id;
    const placeholder = document.createElement("div");
    placeholder.className = "placeholder";
    const caption = document.createElement("span");
    caption.textContent = entry.prompt;
    item.title = `${entry.prompt} (seed ${entry.seed})`;
    item.append(placeholder, caption);
    list.append(item);
    loadThumbnail(item, entry);
  }
}

async function loadThumbnail(item, entry) {
  try {
    const job = await api(`v1/jobs/${encodeURIComponent(entry.id)}`);
    if (job.status !== "succeeded") return;
    const image = document.createElement("img");
    image.src = await imageSource(job);
    image.alt = entry.prompt;
    item.firstChild.replaceWith(image);
    item.onclick = () => showResult(job).then(() => setStatus(describe(job), "succeeded"));
  } catch (err) {
    if (err.status === 404) {
      saveRecent(recentJobs().filter((j) => j.id !== entry.id));
      item.remove();
    }
  }
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => {
    const key = keyInput.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  });
  keyInput.addEventListener("change", renderRecent);
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("job-form").requestSubmit();
  });
  loadLimits();
  renderRecent();
}

init();
