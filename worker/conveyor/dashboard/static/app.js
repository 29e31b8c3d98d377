// The dashboard page: renders the live feed (/api/events) and calls the API for actions.
// Every value from the server is put in the page as text, never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const CLASSES = ["critical", "high", "normal", "low"];
const COLOURS = { critical: "#d64545", high: "#e08a1e", normal: "#3b7dd8", low: "#7a8796" };
const $ = (selector) => document.querySelector(selector);

// -- helpers --------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.map((c) => (c instanceof Node ? c : String(c ?? ""))));
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.round(value / 60)} min`;
}

function when(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "–";
}

async function api(path, body) {
  const options = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.headers["X-CSRF-Token"] = CSRF;
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("logged out");
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// Rows for a table body, or one muted "none" row so an empty table does not look broken.
function fill(body, rows, columns) {
  if (rows.length) body.replaceChildren(...rows);
  else body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "muted" }, "none")));
}

function jobLink(id) {
  return el("a", { href: "#job", class: "job-link", onclick: () => showJob(id) }, id);
}

// -- live numbers ---------------------------------------------------------------------------------

let totals = {};

function renderClasses(classes) {
  const body = $("#classes tbody");
  body.replaceChildren(
    ...classes.map((c) => {
      const counted = totals[c.priority] || {};
      const cell = (field, value) => el("td", { "data-class": c.priority, "data-field": field }, value);
      return el(
        "tr",
        {},
        el("th", { class: `class-${c.priority}` }, c.priority),
        cell("ready", c.ready),
        cell("due_delayed", c.due_delayed),
        cell("future_delayed", c.future_delayed),
        cell("in_flight", c.in_flight),
        cell("dead", c.dead),
        cell("oldest_ready_age", seconds(c.oldest_ready_age)),
        cell("limited_groups", c.limited_groups),
        cell("wait_p50", seconds(c.wait_p50)),
        cell("wait_p90", seconds(c.wait_p90)),
        cell("wait_p99", seconds(c.wait_p99)),
        cell("throughput", c.throughput.toFixed(2)),
        cell("failure_rate", c.failure_rate === null ? "–" : `${(c.failure_rate * 100).toFixed(1)} %`),
        cell("queued", counted.queued || 0),
        cell("completed", counted.completed || 0),
      );
    }),
  );
}

// Totals arrive with every batch of events, ahead of the next stats poll.
function renderTotals() {
  for (const cls of CLASSES) {
    for (const field of ["queued", "completed"]) {
      const cell = document.querySelector(`td[data-class="${cls}"][data-field="${field}"]`);
      const value = String((totals[cls] || {})[field] || 0);
      if (cell && cell.textContent !== value) cell.textContent = value;
    }
  }
}

function renderWorkers(workers) {
  $("#worker-count").textContent = `${workers.length} live`;
  fill(
    $("#workers tbody"),
    workers.map((w) =>
      el(
        "tr",
        {},
        el("td", {}, w.identity),
        el("td", {}, w.pod || "–"),
        el("td", {}, w.classes.join(", ")),
        el("td", {}, `${w.busy}/${w.concurrency}`),
        el("td", {}, w.draining ? "draining" : ""),
        el("td", {}, seconds(Math.max(0, Date.now() / 1000 - w.last_beat)) + " ago"),
        el("td", { class: "jobs" }, ...w.jobs.flatMap((id) => [jobLink(id), " "])),
      ),
    ),
    7,
  );
}

function renderGroups(stats) {
  fill(
    $("#limited tbody"),
    stats.limited.map((g) =>
      el("tr", {}, el("td", {}, g.group), el("td", {}, g.priority),
        el("td", {}, seconds(Math.max(0, g.until - stats.at)))),
    ),
    3,
  );
  fill(
    $("#limits tbody"),
    Object.entries(stats.limits).map(([group, spec]) => {
      const [count, windowMs] = spec.split(":");
      const text = spec === "-" ? "exempt" : `${count} per ${seconds(Number(windowMs) / 1000)}`;
      return el("tr", {}, el("td", {}, group === "*" ? "* (default)" : group), el("td", {}, text));
    }),
    2,
  );
  fill(
    $("#paused tbody"),
    stats.paused.map((group) =>
      el("tr", {}, el("td", {}, group),
        el("td", {}, el("button", { onclick: () => act("/api/groups/resume", { group }, "#group-status") }, "Resume"))),
    ),
    2,
  );
}

function renderCharts(charts) {
  const depth = CLASSES.map((cls) => ({
    name: cls,
    colour: COLOURS[cls],
    values: charts.depth.map(([, backlog]) => backlog[cls] || 0),
  }));
  drawChart($("#depth-chart"), depth, 600);
  drawLegend($("#depth-legend"), depth);
  const flow = [
    { name: "completed", colour: "#2f9e5b", values: charts.throughput.completed },
    { name: "failed", colour: "#d64545", values: charts.throughput.failed },
  ];
  drawChart($("#throughput-chart"), flow, 600);
  drawLegend($("#throughput-legend"), flow);
}

function onStats(stats) {
  const banner = $("#banner");
  banner.hidden = stats.redis_up;
  if (!stats.redis_up) {
    banner.textContent = `Redis unreachable: ${stats.error}`;
    return;
  }
  totals = stats.totals;
  renderClasses(stats.classes);
  renderWorkers(stats.workers);
  renderGroups(stats);
  if (stats.charts) renderCharts(stats.charts);
  $("#updated").textContent = `updated ${new Date(stats.at * 1000).toLocaleTimeString()}`;
}

const DLQ_KINDS = new Set(["dead_lettered", "replayed", "purged"]);
let dlqRefresh = null;

// The detail field's meaning depends on the event kind (see conveyor.history.queries.JobEvent).
function describe(e) {
  const [head, tail] = [e.detail.split(":")[0], e.detail.split(":").slice(1).join(":")];
  switch (e.kind) {
    case "queued":
      return e.detail.startsWith("at:") ? `delayed until ${when(Number(tail) / 1000)}` : "queued";
    case "started":
      return `started by ${e.detail.split("/")[0]} (attempt ${e.attempt})`;
    case "completed":
      return `completed in ${seconds(Number(e.detail) / 1000)}`;
    case "retried":
      return `failed (${head}), retry in ${seconds(Number(tail) / 1000)}`;
    case "dead_lettered":
      return `dead-lettered (${e.detail})`;
    case "replayed":
      return `replayed (replay ${e.detail})`;
    case "handed_back":
      return "handed back by a draining worker";
    default:
      return `${e.kind.replace("_", " ")} (${e.detail})`;
  }
}

function onEvents(message) {
  totals = message.totals;
  renderTotals();
  const recent = $("#recent");
  for (const e of message.events) {
    recent.prepend(
      el("li", { class: `kind-${e.kind}` },
        el("time", {}, new Date(e.at * 1000).toLocaleTimeString()), " ",
        jobLink(e.id), ` ${e.type} [${e.priority}] ${describe(e)}`),
    );
  }
  while (recent.children.length > 30) recent.lastChild.remove();
  if (message.events.some((e) => DLQ_KINDS.has(e.kind))) {
    clearTimeout(dlqRefresh);
    dlqRefresh = setTimeout(loadDeadLetters, 200);
  }
}

function connect() {
  const live = $("#live");
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => {
    live.className = "live on";
    live.textContent = "live";
  });
  source.addEventListener("error", () => {
    live.className = "live off";
    live.textContent = "reconnecting…";
  });
  source.addEventListener("stats", (e) => onStats(JSON.parse(e.data)));
  source.addEventListener("events", (e) => onEvents(JSON.parse(e.data)));
}

// -- dead letters ---------------------------------------------------------------------------------

function dlqFilters() {
  const form = new FormData($("#dlq-filters"));
  const filters = {};
  for (const name of ["type", "group", "reason"]) {
    const value = form.get(name).trim();
    if (value) filters[name] = value;
  }
  for (const name of ["since", "until"]) {
    const value = form.get(name);
    if (value) filters[name] = new Date(value).getTime() / 1000;
  }
  return filters;
}

async function loadDeadLetters() {
  const query = new URLSearchParams({ ...dlqFilters(), limit: 200 });
  const data = await api(`/api/dead-letters?${query}`);
  $("#dlq-all").checked = false;
  fill(
    $("#dlq tbody"),
    data.dead_letters.map((job) => {
      const last = job.errors.length ? job.errors[job.errors.length - 1].error : "";
      return el(
        "tr",
        { "data-job": job.id },
        el("td", {}, el("input", { type: "checkbox", class: "dlq-pick", value: job.id, "aria-label": `select ${job.id}` })),
        el("td", {}, jobLink(job.id)),
        el("td", {}, job.type),
        el("td", {}, job.priority),
        el("td", {}, job.group || "–"),
        el("td", {}, job.dead_reason),
        el("td", {}, `${job.attempts}/${job.max_attempts}`),
        el("td", {}, when(job.dead_at)),
        el("td", { class: "error-text", title: last }, last),
        el("td", { class: "row-actions" },
          el("button", { class: "replay", onclick: () => act("/api/dead-letters/replay", { ids: [job.id] }) }, "Replay"),
          el("button", { class: "danger purge", onclick: () => confirmPurge({ ids: [job.id] }) }, "Purge")),
      );
    }),
    10,
  );
  $("#dlq-count").textContent = `${data.dead_letters.length} shown (at most ${data.limit})`;
}

function picked() {
  return [...document.querySelectorAll(".dlq-pick:checked")].map((box) => box.value);
}

function confirmPurge(body) {
  const what = body.all ? "every matching dead letter" : `${body.ids.length} dead letter(s)`;
  if (window.confirm(`Delete ${what} for good?`)) act("/api/dead-letters/purge", body);
}

async function act(path, body, statusAt = "#dlq-status") {
  const status = $(statusAt);
  try {
    const result = await api(path, body);
    status.textContent = Object.entries(result)
      .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.length : v}`)
      .join(", ");
    loadDeadLetters();
  } catch (error) {
    status.textContent = `failed: ${error.message}`;
  }
}

// -- one job --------------------------------------------------------------------------------------

async function showJob(id) {
  const panel = $("#job-panel");
  $("#job-form").elements.id.value = id;
  panel.replaceChildren(el("p", { class: "muted" }, "loading…"));
  let data;
  try {
    data = await api(`/api/jobs/${encodeURIComponent(id)}`);
  } catch (error) {
    panel.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const parts = [];
  if (data.job) {
    const j = data.job;
    parts.push(
      el("dl", { class: "record" },
        ...[["state", j.state], ["type", j.type], ["class", j.priority], ["group", j.group || "–"],
          ["attempts", `${j.attempts}/${j.max_attempts}`], ["replays", j.replay_count],
          ["created", when(j.created_at)], ["dead reason", j.dead_reason || "–"]]
          .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      el("pre", { class: "payload" }, JSON.stringify(j.payload, null, 2)),
    );
    for (const e of j.errors) {
      parts.push(el("p", { class: "error-text" }, `attempt ${e.attempt} (${e.reason}): ${e.error}`));
    }
  } else {
    parts.push(el("p", { class: "muted" }, `Redis no longer holds job ${id} (finished and purged jobs are removed).`));
  }
  const history = data.history;
  if (!history.available) {
    parts.push(el("p", { class: "notice", id: "history-unavailable" }, history.reason));
  } else {
    parts.push(
      el("table", { class: "history" },
        el("thead", {}, el("tr", {}, ...["time", "event", "attempt", "worker", "detail"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...history.events.map((e) =>
          el("tr", {}, el("td", {}, new Date(e.at * 1000).toISOString()), el("td", {}, e.kind),
            el("td", {}, e.attempt || ""), el("td", {}, e.worker), el("td", {}, e.detail))))),
    );
  }
  panel.replaceChildren(...parts);
}

// -- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("#dlq-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    loadDeadLetters();
  });
  $("#dlq-all").addEventListener("change", (e) => {
    for (const box of document.querySelectorAll(".dlq-pick")) box.checked = e.target.checked;
  });
  $("#dlq-replay-selected").addEventListener("click", () => act("/api/dead-letters/replay", { ids: picked() }));
  $("#dlq-purge-selected").addEventListener("click", () => confirmPurge({ ids: picked() }));
  $("#dlq-replay-all").addEventListener("click", () =>
    act("/api/dead-letters/replay", { all: true, filters: dlqFilters() }));
  $("#dlq-purge-all").addEventListener("click", () => confirmPurge({ all: true, filters: dlqFilters() }));
  $("#pause-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = e.target.elements.group;
    act("/api/groups/pause", { group: input.value.trim() }, "#group-status");
    input.value = "";
  });
  $("#job-form").addEventListener("submit", (e) => {
    e.preventDefault();
    showJob(e.target.elements.id.value.trim());
  });
  $("#logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": CSRF } });
    window.location.assign("/login");
  });
}

wire();
connect();
loadDeadLetters();
