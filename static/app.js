// trainvisor's browser page: plain JavaScript, no framework, no build step.
//
// Live data comes from two Server-Sent-Event streams and nothing polls the server:
//   GET /events                       job, worker, restart, checkpoint, progress, deleted
//                                     (and hello / resync: re-read everything from the API)
//   GET /jobs/{id}/logs/stream?rank=R the open job's log lines (ids are log seqs)
// A one-second timer only re-renders ages from data already here.
"use strict";
(() => {
  const TERMINAL = new Set(["succeeded", "failed", "stopped"]);
  const MAX_LOG_LINES = 5000;     // lines kept in the log view
  const MAX_BUFFERED = 20000;     // lines held while the view is paused
  const MAX_POINTS = 1500;        // chart points kept per job
  const LOG_TAIL = 500;           // lines replayed when a log stream opens

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- state
  const jobs = new Map();       // job_id -> job record (GET /jobs) + live progress fields
  const history = new Map();    // job_id -> [{t, step, loss, rate}] from progress events
  let open = null;              // the job shown in the job view
  let events = null;            // EventSource on /events
  let skewMs = 0;               // browser clock minus server clock, from event timestamps
  let signedOut = false;        // the server answered 401: the list is empty until sign-in

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "href" ||
                 k === "title" || k === "id" || k === "tabindex" || k === "scope") node.setAttribute(k, v);
        else node[k] = v;
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function setText(node, text) {
    const s = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== s) node.textContent = s;
  }

  class ApiError extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  // Every API call: JSON in, JSON out; a non-2xx answer becomes an ApiError carrying the
  // server's {"error": CODE, "message": TEXT}.
  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError("network", `cannot reach the server (${e.message})`, 0);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (!res.ok) {
      const code = (data && typeof data.error === "string") ? data.error : `http_${res.status}`;
      const message = (data && typeof data.message === "string") ? data.message
        : (text || res.statusText || `HTTP ${res.status}`);
      if (res.status === 401 && path !== "/session") needSignIn(message);
      throw new ApiError(code, message, res.status);
    }
    return data;
  }

  // Why an EventSource was refused (it only says "error"): ask the same URL with fetch.
  async function diagnose(url) {
    const ctl = new AbortController();
    try {
      const res = await fetch(url, { signal: ctl.signal, headers: { Accept: "text/event-stream" } });
      if (res.ok) { ctl.abort(); return null; }
      let data = null;
      try { data = await res.json(); } catch { data = null; }
      const code = (data && data.error) || `http_${res.status}`;
      const message = (data && data.message) || res.statusText || `HTTP ${res.status}`;
      if (res.status === 401) needSignIn(message);
      return new ApiError(code, message, res.status);
    } catch (e) {
      return new ApiError("network", `cannot reach the server (${e.message})`, 0);
    }
  }

  // Runs `fn` now, or once more after the current run if called while it runs: a burst of
  // events costs at most two fetches.
  function coalesced(fn) {
    let running = false;
    let again = false;
    return async function run() {
      if (running) { again = true; return; }
      running = true;
      try {
        do {
          again = false;
          try { await fn(); } catch (e) { reportError(e); }
        } while (again);
      } finally {
        running = false;
      }
    };
  }

  // The server publishes an event when it decides something and its recorder writes the
  // history a moment later, so a fetch made on an event can still read the state before it.
  // Such a fetch is repeated a few times shortly after, until it shows what the event said
  // (a bounded retry on an event, not a polling timer).
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  async function fetchFresh(fetchFn, isFresh, tries = 8) {
    let data = null;
    for (let i = 0; i < tries; i++) {
      data = await fetchFn();
      if (data === null || data === undefined || isFresh(data)) return data;
      await sleep(100 * (i + 1));
    }
    return data;
  }

  // Server timestamps are RFC 3339 with microseconds; keep milliseconds for Date.
  function parseTs(s) {
    if (!s) return NaN;
    return Date.parse(String(s).replace(/(\.\d{3})\d+/, "$1"));
  }
  const serverNow = () => Date.now() - skewMs;

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    seconds = Math.max(0, seconds);
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.floor(seconds)} s`;
    const m = Math.floor(seconds / 60);
    if (m < 60) return `${m} min ${Math.floor(seconds % 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }
  // The jobs list's Age: one unit, so the column stays narrow ("12 s", "5 min", "3 h", "2 d");
  // the exact times are in the cell's tooltip.
  function fmtAgeShort(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return `${Math.floor(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 48 * 3600) return `${Math.floor(seconds / 3600)} h`;
    return `${Math.floor(seconds / 86400)} d`;
  }
  const ageSince = (ts) => {
    const t = parseTs(ts);
    return Number.isFinite(t) ? (serverNow() - t) / 1000 : null;
  };
  function fmtTime(ts) {
    const t = parseTs(ts);
    if (!Number.isFinite(t)) return "—";
    const d = new Date(t);
    const today = new Date();
    const hms = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === today.toDateString() ? hms : `${d.toLocaleDateString()} ${hms}`;
  }
  function fmtNum(x, digits) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "—";
    if (digits !== undefined) return x.toFixed(digits);
    const a = Math.abs(x);
    if (a !== 0 && (a < 0.001 || a >= 1e6)) return x.toExponential(2);
    return a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(3);
  }
  function fmtBytes(n) {
    if (!Number.isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }
  const shortId = (id) => String(id).slice(0, 8);
  const jobLabel = (job) => (job && job.name) || shortId(job ? job.job_id : "");

  function badge(stateName, extra) {
    return el("span", { class: "badge", "data-state": stateName || "", text: stateName || "—", ...extra });
  }

  function reportError(e) {
    console.error(e);
    if (e instanceof ApiError && e.status === 401) return;   // the sign-in form says it
    const banner = $("page-error");
    banner.textContent = e instanceof ApiError ? `${e.code}: ${e.message}` : String(e && e.message || e);
    banner.hidden = false;
    (window.__tvErrors = window.__tvErrors || []).push(banner.textContent);
  }
  function clearPageError() { $("page-error").hidden = true; }
  window.addEventListener("error", (ev) => reportError(ev.error || ev.message));
  window.addEventListener("unhandledrejection", (ev) => reportError(ev.reason));

  // ---------------------------------------------------------------- jobs list
  function upsertJob(record) {
    const prev = jobs.get(record.job_id) || {};
    const merged = { ...prev, ...record };
    if (record.spec && record.spec.total_steps !== undefined) merged.total_steps = record.spec.total_steps;
    jobs.set(record.job_id, merged);
    return merged;
  }

  function renderJobs() {
    const body = $("jobs-body");
    const list = [...jobs.values()].sort((a, b) =>
      (parseTs(b.created_at) || 0) - (parseTs(a.created_at) || 0) || String(a.job_id).localeCompare(String(b.job_id)));
    const rows = new Map([...body.children].map((tr) => [tr.dataset.jobId, tr]));
    for (const [id, tr] of rows) if (!jobs.has(id)) tr.remove();
    list.forEach((job, i) => {
      let tr = rows.get(job.job_id);
      if (!tr) tr = newJobRow(job.job_id);
      fillJobRow(tr, job);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    // Signed out, the list is empty because the server will not say: not "no jobs".
    setText($("jobs-empty"), signedOut ? "Sign in to see the jobs." : "No jobs yet: submit one below.");
    $("jobs-empty").hidden = jobs.size > 0;
  }

  function newJobRow(id) {
    const link = el("a", { href: `#/jobs/${id}` });
    const tr = el("tr", { "data-job-id": id },
      el("td", null, link, el("span", { class: "sub" })),
      el("td", null, badge("")),
      el("td"),
      el("td", { class: "num" }),
      el("td", { class: "age" }));
    tr.addEventListener("click", (ev) => {
      if (ev.target.closest("a")) return;
      location.hash = `#/jobs/${id}`;
    });
    return tr;
  }

  function fillJobRow(tr, job) {
    const [cName, cState, cProg, cRestarts] = tr.children;
    const link = cName.firstChild;
    setText(link, job.name || shortId(job.job_id));
    link.title = job.job_id;
    // The world size rides under the name, so the name gets the room of a column.
    const ranks = job.world_size === 1 ? "1 rank" : `${job.world_size} ranks`;
    setText(cName.lastChild, job.name ? `${shortId(job.job_id)} · ${ranks}` : ranks);
    const b = cState.firstChild;
    b.dataset.state = job.state || "";
    setText(b, job.state);
    tr.dataset.state = job.state || "";
    if (job.reason) cState.title = job.reason; else cState.removeAttribute("title");
    renderProgressCell(cProg, job);
    setText(cRestarts, job.restarts ?? 0);
    if (open && open.id === job.job_id) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
    renderJobAge(tr, job);
  }

  function renderProgressCell(cell, job) {
    let text;
    let frac = null;
    if (Number.isFinite(job.progress)) {
      frac = job.progress;
      text = `${Math.floor(job.progress * 100)}%`;
    } else if (Number.isFinite(job.step)) {
      text = `step ${job.step}`;
    } else {
      text = job.state === "succeeded" ? "done" : "—";
    }
    let bar = cell.querySelector(".bar");
    let label = cell.querySelector(".label");
    if (!label) {
      bar = el("span", { class: "bar", "aria-hidden": "true" }, el("span"));
      label = el("span", { class: "label" });
      cell.append(bar, label);
    }
    bar.hidden = frac === null;
    if (frac !== null) bar.firstChild.style.width = `${Math.min(100, frac * 100).toFixed(1)}%`;
    setText(label, text);
    cell.title = Number.isFinite(job.step) ? `step ${job.step}${job.total_steps ? ` of ${job.total_steps}` : ""}` : "";
  }

  function renderJobAge(tr, job) {
    const cell = tr.children[4];
    setText(cell, fmtAgeShort(ageSince(job.created_at)));
    cell.title = `created ${fmtTime(job.created_at)}` +
      (job.finished_at ? `, finished ${fmtTime(job.finished_at)}` : "");
  }

  const refreshJobs = coalesced(async () => {
    const [list, summaries] = await Promise.all([
      api("GET", "/jobs"),
      api("GET", "/jobs/summaries").catch(() => []),
    ]);
    const seen = new Set();
    for (const rec of list) { upsertJob(rec); seen.add(rec.job_id); }
    for (const id of [...jobs.keys()]) if (!seen.has(id)) jobs.delete(id);
    for (const s of summaries) {
      const job = jobs.get(String(s.job_id));
      if (job) Object.assign(job, { step: s.step, progress: s.progress, total_steps: s.total_steps });
    }
    renderJobs();
  });

  async function fetchJob(id, wantTerminal) {
    try {
      const rec = await fetchFresh(() => api("GET", `/jobs/${id}`),
        (r) => !wantTerminal || TERMINAL.has(r.state));
      if (wantTerminal && !TERMINAL.has(rec.state)) {
        // Still the state before the event: keep what the event said.
        delete rec.state;
        delete rec.reason;
      }
      upsertJob(rec);
      renderJobs();
      if (open && open.id === id) renderOpenHeader();
    } catch (e) {
      if (e.status !== 404) reportError(e);
    }
  }

  // ---------------------------------------------------------------- the job view
  function newOpen(id) {
    return {
      id,
      summary: null,
      summaryAt: 0,          // performance.now() when the summary arrived (for heartbeat ages)
      summaryAsked: 0,       // performance.now() when it was last requested
      restarts: [],
      incidents: [],
      checkpoints: [],
      missing: false,
      expectRestarts: 0,     // restart decisions the events told of
      launched: new Map(),   // rank -> attempt seen running (its restart has a restarted_at)
      expectCheckpoint: -1,  // newest committed step the events told of
      refreshSummary: coalesced(async () => {
        if (open && open.id === id) open.summaryAsked = performance.now();
        const s = await api("GET", `/jobs/${id}/summary`).catch((e) => onJobFetchError(id, e));
        if (!s || !open || open.id !== id) return;
        open.summary = s;
        open.summaryAt = performance.now();
        open.expectRestarts = Math.max(open.expectRestarts, s.restarts || 0);
        const job = jobs.get(id);
        if (job) {
          Object.assign(job, { state: s.state, reason: s.reason, restarts: s.restarts, step: s.step,
            progress: s.progress, total_steps: s.total_steps });
        }
        seedHistory(id, s);
        renderJobs();
        renderOpen();
        const g = s.goodput;
        if (g && (open.incidents.length < g.incidents || open.incidents.some((i) => i.end === "open"))) {
          open.refreshIncidents();
        }
      }),
      refreshIncidents: coalesced(async () => {
        const r = await api("GET", `/jobs/${id}/incidents`).catch((e) => onJobFetchError(id, e));
        if (!r || !open || open.id !== id) return;
        open.incidents = r;
        renderIncidents();
      }),
      refreshRestarts: coalesced(async () => {
        const r = await fetchFresh(
          () => api("GET", `/jobs/${id}/restarts`).catch((e) => onJobFetchError(id, e)),
          (rows) => !open || open.id !== id || (rows.length >= open.expectRestarts &&
            !rows.some((x) => !x.restarted_at && (open.launched.get(x.rank) ?? -1) >= x.attempt)));
        if (!r || !open || open.id !== id) return;
        open.restarts = r;
        renderRestarts();
        renderCharts();
      }),
      refreshCheckpoints: coalesced(async () => {
        const c = await fetchFresh(
          () => api("GET", `/jobs/${id}/checkpoints`).catch((e) => onJobFetchError(id, e)),
          (rows) => !open || open.id !== id || open.expectCheckpoint < 0 ||
            rows.some((x) => x.step >= open.expectCheckpoint));
        if (!c || !open || open.id !== id) return;
        open.checkpoints = c;
        renderCheckpoints();
      }),
      log: null,
    };
  }

  function onJobFetchError(id, e) {
    if (!open || open.id !== id) return null;   // an answer for a view already left
    if (e.status === 404) {
      open.missing = true;
      showJobError(`No job ${id}: ${e.message}`);
      return null;
    }
    reportError(e);
    return null;
  }

  function refreshOpenAll() {
    if (!open) return;
    loadHistory(open.id);
    open.refreshSummary();
    open.refreshRestarts();
    open.refreshCheckpoints();
  }

  function openJob(id) {
    if (open && open.id === id) return;
    closeLogStream();
    open = id ? newOpen(id) : null;
    $("job-none").hidden = !!open;
    $("job-detail").hidden = !open;
    $("job-view").dataset.jobId = id || "";
    document.body.dataset.view = open ? "job" : "list";
    renderJobs();
    if (!open) { document.title = "trainvisor"; return; }
    showJobError(null);
    $("ranks-body").replaceChildren();
    $("restarts-body").replaceChildren();
    $("checkpoints-body").replaceChildren();
    $("log-rank").value = "";
    setFollow(true);
    renderOpen();
    renderRestarts();
    renderIncidents();
    renderCheckpoints();
    if (!jobs.has(id)) fetchJob(id);
    refreshOpenAll();
    openLogStream();
  }

  function showJobError(text) {
    const b = $("job-error");
    b.hidden = !text;
    b.textContent = text || "";
  }

  function openState() {
    const job = open && jobs.get(open.id);
    return (job && job.state) || (open && open.summary && open.summary.state) || "";
  }

  function renderOpenHeader() {
    if (!open) return;
    const job = jobs.get(open.id) || {};
    const s = open.summary || {};
    const name = job.name || s.name;
    setText($("job-title"), name || `Job ${shortId(open.id)}`);
    setText($("job-id"), open.id);
    const st = openState();
    const b = $("job-state");
    b.dataset.state = st;
    setText(b, st || "…");
    setText($("job-reason"), job.reason ?? s.reason ?? "");
    const terminal = TERMINAL.has(st);
    $("stop-btn").disabled = terminal || open.missing || !st;
    $("delete-btn").disabled = open.missing || !st;
    document.title = `${name || shortId(open.id)} (${st || "…"}) · trainvisor`;
  }

  function renderOpen() {
    if (!open) return;
    renderOpenHeader();
    const job = jobs.get(open.id) || {};
    const s = open.summary || {};
    const step = Number.isFinite(job.step) ? job.step : s.step;
    const total = s.total_steps ?? job.total_steps;
    setText($("st-step"), Number.isFinite(step) ? (total ? `${step} / ${total}` : String(step)) : "—");
    const progress = Number.isFinite(job.progress) ? job.progress : s.progress;
    $("job-bar").style.width = Number.isFinite(progress) ? `${Math.min(100, progress * 100).toFixed(1)}%` : "0";
    const live = job.live || {};
    const terminal = TERMINAL.has(openState());
    setText($("st-rate"), terminal ? "—" : fmtNum(live.steps_per_s ?? s.steps_per_s));
    setText($("st-eta"), terminal ? "—" : fmtAge(live.eta_s ?? s.eta_s));
    setText($("st-loss"), fmtNum(live.loss ?? s.loss));
    setText($("st-restarts"), job.restarts ?? s.restarts ?? 0);
    setText($("st-scope"), s.restart_scope || (job.spec && job.spec.restart_scope) || "—");
    setText($("st-ckpt"), Number.isFinite(s.last_checkpoint_step)
      ? `step ${s.last_checkpoint_step}` : "—");
    $("st-ckpt").title = s.last_checkpoint_at ? `committed ${fmtTime(s.last_checkpoint_at)}` : "";
    // What the job cannot show (no step ever reported) and how to get it, from the server.
    const noSteps = $("no-step-data");
    setText(noSteps, s.no_step_data || "");
    noSteps.hidden = !s.no_step_data;
    renderRanks();
    renderCharts();
    renderAges();
    syncRankFilter();
  }

  function renderRanks() {
    const body = $("ranks-body");
    const s = open && open.summary;
    const workers = (s && s.workers) || [];
    const rows = new Map([...body.children].map((tr) => [tr.dataset.rank, tr]));
    workers.forEach((w, i) => {
      const key = String(w.rank);
      let tr = rows.get(key);
      if (!tr) {
        tr = el("tr", { "data-rank": key },
          el("td", { text: key }), el("td", null, badge("")), el("td", { class: "pid" }),
          el("td"), el("td"), el("td", { class: "hb" }), el("td"), el("td", { class: "standby" }));
      }
      rows.delete(key);
      const [, cState, cPid, cAttempt, cRestarts, , cStep, cStandby] = tr.children;
      tr.dataset.state = w.state;
      cState.firstChild.dataset.state = w.state;
      setText(cState.firstChild, w.state);
      // A straggler: flagged beside its state, with its rate in the tooltip.
      tr.dataset.straggler = w.straggler ? "true" : "false";
      let flag = cState.querySelector(".straggler");
      if (w.straggler && !flag) {
        flag = el("span", { class: "badge straggler", "data-state": "failed", text: "straggler" });
        cState.append(" ", flag);
      } else if (!w.straggler && flag) {
        flag.remove();
      }
      if (flag && w.straggler) flag.title = `${fmtNum(w.steps_per_s)} steps/s, slower than the job's median`;
      // A warm start: this incarnation was the rank's standby.
      let warm = cState.querySelector(".warm");
      if (w.warm_start && !warm) {
        warm = el("span", { class: "badge warm", "data-state": "succeeded", text: "warm",
          title: "this incarnation was the rank's warm standby (preloaded), not a cold start" });
        cState.append(" ", warm);
      } else if (!w.warm_start && warm) {
        warm.remove();
      }
      const sb = w.standby;
      setText(cStandby, sb ? `${sb.state} · pid ${sb.pid}` : "—");
      cStandby.dataset.state = sb ? sb.state : "";
      cStandby.title = sb ? `on ${sb.node} since ${fmtTime(sb.since)}` : "no warm standby";
      setText(cPid, w.pid ?? "—");
      setText(cAttempt, w.attempt);
      setText(cRestarts, w.restarts);
      setText(cStep, w.step ?? "—");
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const tr of rows.values()) tr.remove();
    const off = $("standby-off");
    off.hidden = !(s && s.standby_off);
    setText(off, (s && s.standby_off) || "");
  }

  // Heartbeat ages: the summary's age plus the time since it arrived (no clock skew).
  function renderAges() {
    for (const tr of $("jobs-body").children) {
      const job = jobs.get(tr.dataset.jobId);
      if (job) renderJobAge(tr, job);
    }
    if (!open) return;
    const job = jobs.get(open.id) || {};
    const s = open.summary || {};
    const created = job.created_at || s.created_at;
    const end = job.finished_at ? parseTs(job.finished_at) : null;
    const age = created ? ((end || serverNow()) - parseTs(created)) / 1000 : null;
    setText($("st-age"), job.finished_at ? `ran ${fmtAge(age)}` : fmtAge(age));
    const elapsed = (performance.now() - open.summaryAt) / 1000;
    const terminal = TERMINAL.has(openState());
    for (const tr of $("ranks-body").children) {
      const w = (s.workers || []).find((x) => String(x.rank) === tr.dataset.rank);
      const cell = tr.children[5];
      if (!w || w.heartbeat_age_s === null || w.heartbeat_age_s === undefined) {
        setText(cell, "—");
      } else {
        setText(cell, terminal ? fmtTime(w.last_heartbeat_at) : `${fmtAge(w.heartbeat_age_s + elapsed)} ago`);
      }
      cell.title = w && w.last_heartbeat_at ? fmtTime(w.last_heartbeat_at) : "no heartbeat yet";
    }
  }

  function renderRestarts() {
    const body = $("restarts-body");
    const list = open ? [...open.restarts].reverse() : [];   // newest first
    const rows = list.map((r, i) => {
      const detail = r.detail || "";
      const nl = detail.indexOf("\n");
      const head = (nl >= 0 ? detail.slice(0, nl) : detail).replace(/;\s*last lines:\s*$/, "");
      const tail = nl >= 0 ? detail.slice(nl + 1) : "";
      const cause = el("td", { class: "cause" }, el("span", { class: "cause-head", text: head || r.reason }));
      if (tail) {
        cause.append(el("details", null, el("summary", { text: "last output" }), el("pre", { text: tail })));
      }
      return el("tr", { "data-restart": String(list.length - 1 - i), "data-rank": r.rank, "data-reason": r.reason },
        el("td", { text: fmtTime(r.detected_at), title: r.detected_at }),
        el("td", { class: "num", text: r.rank }),
        el("td", { class: "num", text: r.attempt }),
        el("td", { text: r.scope }),
        el("td", null, el("span", { class: "badge", "data-state": "failed", text: r.reason })),
        cause,
        el("td", { class: "num", text: `${r.backoff_ms} ms` }),
        el("td", { text: r.restarted_at ? fmtTime(r.restarted_at) : "pending", title: r.restarted_at || "" }));
    });
    // Keep open <details> open across re-renders.
    const opened = new Set([...body.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.restart));
    body.replaceChildren(...rows);
    for (const tr of rows) {
      if (opened.has(tr.dataset.restart)) { const d = tr.querySelector("details"); if (d) d.open = true; }
    }
    $("restarts-empty").hidden = rows.length > 0;
  }

  // One row per incident: its cause, then its recovery as a bar whose segments are the
  // phases (waiting to relaunch, starting, catching up to the checkpoint), each labelled with
  // its name and duration so the bar reads without a legend.
  function renderIncidents() {
    const list = open ? open.incidents : [];
    const s = open && open.summary;
    const g = s && s.goodput;
    setText($("goodput"), g ? `Goodput ${g.estimate ? "≤ " : ""}${fmtNum(g.goodput, 3)}: of ${fmtNum(g.wall_s, 1)} s, ` +
      `${fmtNum(g.recovering_s, 1)} s recovering (${fmtNum(g.backoff_s, 1)} s in backoff), ` +
      `${g.steps_redone} steps redone` +
      (g.estimate ? "; an estimate: steps lost unknown (no step data), redone steps left out" : "") : "");
    // The last save on notice (stop, SIGTERM, SIGUSR1, checkpoint request) and what it cost.
    const n = s && s.last_notice;
    setText($("notice"), n ? `Save on notice (${n.cause}): ${n.outcome}` +
      (n.saved_at_step != null ? `, resumes at step ${n.saved_at_step}` : ", resumes at step 0") +
      `, ${n.steps_lost} steps lost` : "");
    const longest = Math.max(0.001, ...list.map((i) => i.seconds_lost));
    const rows = list.map((i) => {
      const t0 = parseTs(i.detected_at);
      const at = (k) => (i[k] ? (parseTs(i[k]) - t0) / 1000 : null);
      const phases = [
        ["relaunch", 0, at("spawned_at")],
        ["start", at("spawned_at"), at("first_heartbeat_at")],
        ["catch up", at("first_heartbeat_at"), at("training_at")],
      ];
      const bar = el("div", { class: "incident-bar", role: "img",
        "aria-label": phases.filter(([, a, b]) => a !== null && b !== null)
          .map(([n, a, b]) => `${n} ${fmtNum(b - a, 2)} s`).join(", ") || "no phase yet" });
      for (const [name, a, b] of phases) {
        if (a === null || b === null) continue;
        const w = Math.max(0, b - a);
        bar.append(el("span", { class: "phase", "data-phase": name.replace(" ", "-"),
          style: `width:${(100 * w / longest).toFixed(2)}%`, title: `${name} ${fmtNum(w, 2)} s`,
          text: `${name} ${fmtNum(w, 2)} s` }));
      }
      const ranks = i.ranks.length === 1 ? `rank ${i.ranks[0]}` : `ranks ${i.ranks.join(",")}`;
      return el("li", { "data-seq": i.seq, "data-end": i.end, "data-rank": i.rank },
        el("p", { class: "incident-head" },
          el("strong", { text: `#${i.seq} rank ${i.rank} ${i.reason}` }), " ",
          el("span", { text: `${(i.detail || "").split("\n")[0]} — ${i.scope} restart of ${ranks} — ` }),
          el("span", { class: "badge", "data-state": i.end === "recovered" ? "succeeded" : "failed", text: i.end }),
          el("span", { class: "muted", text: ` ${fmtTime(i.detected_at)}; lost ${i.steps_lost ?? "unknown"} steps, ${fmtNum(i.seconds_lost, 2)} s` })),
        bar,
        // A hung rank: what every rank was doing before it was killed.
        ...(i.stacks || []).map((st) => el("details", { class: "stacks", "data-rank": st.rank, "data-kind": st.kind },
          el("summary", { text: `stacks of rank ${st.rank} (pid ${st.pid}, ${st.kind})` }),
          el("pre", { text: st.text }))));
    });
    $("incidents").replaceChildren(...rows);
    $("incidents-empty").hidden = rows.length > 0;
  }

  function renderCheckpoints() {
    const body = $("checkpoints-body");
    const list = open ? open.checkpoints : [];
    body.replaceChildren(...list.map((c) => el("tr", { "data-step": c.step },
      el("td", { class: "num", text: c.step }),
      el("td", { text: fmtTime(c.committed_at), title: c.committed_at }),
      el("td", { class: "num", text: fmtBytes(c.bytes) }),
      el("td", { class: "num", text: `${fmtNum(c.commit_ms, 1)} ms` }),
      el("td", { class: "mono", text: c.location }))));
    $("checkpoints-empty").hidden = list.length > 0;
  }

  // ---------------------------------------------------------------- charts
  function pushPoint(id, point) {
    let h = history.get(id);
    if (!h) { h = []; history.set(id, h); }
    const last = h[h.length - 1];
    if (last && point.t < last.t) return;
    h.push(point);
    if (h.length > MAX_POINTS) h.splice(0, h.length - MAX_POINTS);
  }

  // The job's stored history (GET /jobs/{id}/progress), then what arrived live after it.
  async function loadHistory(id) {
    const samples = await api("GET", `/jobs/${id}/progress`).catch(() => null);
    if (!samples || !samples.length) return;
    const stored = samples.map((p) => ({ t: parseTs(p.at), step: p.step, loss: p.loss, rate: p.steps_per_s }))
      .filter((p) => Number.isFinite(p.t));
    const lastStored = stored.length ? stored[stored.length - 1].t : -Infinity;
    const live = (history.get(id) || []).filter((p) => p.t > lastStored);
    const merged = stored.concat(live);
    history.set(id, merged.slice(Math.max(0, merged.length - MAX_POINTS)));
    if (open && open.id === id) renderCharts();
  }

  // Before the stored history arrives (or for a job without one): a point from the summary.
  function seedHistory(id, s) {
    if ((history.get(id) || []).length || s.state !== "running") return;
    if (s.loss === null && s.steps_per_s === null) return;
    pushPoint(id, { t: serverNow(), step: s.step, loss: s.loss, rate: s.steps_per_s });
  }

  function renderCharts() {
    const h = (open && history.get(open.id)) || [];
    // Restarts are marked on the charts where they were detected.
    const marks = open ? open.restarts.map((r) => parseTs(r.detected_at)).filter(Number.isFinite) : [];
    const empty = open && open.summary && open.summary.no_step_data ? "no step data" : "no data yet";
    drawChart($("chart-loss"), h, "loss", marks, empty);
    drawChart($("chart-rate"), h, "rate", marks, empty);
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawChart(root, points, key, marks = [], empty = "no data yet") {
    const W = 480, H = 150, L = 52, R = 10, T = 10, B = 24;
    const pts = points.filter((p) => Number.isFinite(p[key]));
    root.dataset.points = String(pts.length);
    const nodes = [
      svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    ];
    if (!pts.length) {
      nodes.push(svg("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle" },
        empty));
      root.replaceChildren(...nodes);
      return;
    }
    let lo = Math.min(...pts.map((p) => p[key]));
    let hi = Math.max(...pts.map((p) => p[key]));
    if (key === "rate") lo = Math.min(lo, 0);
    if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= key === "rate" ? 0 : (Math.abs(lo) * 0.1 || 1); }
    const t0 = pts[0].t;
    const t1 = Math.max(pts[pts.length - 1].t, t0 + 1000);
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    const shown = marks.filter((m) => m >= t0 && m <= t1);
    root.dataset.restarts = String(shown.length);
    for (const m of shown) {
      nodes.push(svg("line", { class: "restart-mark", x1: x(m), y1: T, x2: x(m), y2: H - B },
        undefined));
    }
    if (pts.length === 1) {
      nodes.push(svg("circle", { class: "dot", cx: x(pts[0].t), cy: y(pts[0][key]), r: 3 }));
    } else {
      nodes.push(svg("polyline", {
        class: "series",
        points: pts.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" "),
      }));
    }
    nodes.push(
      svg("text", { x: L - 4, y: T + 9, "text-anchor": "end" }, fmtNum(hi)),
      svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, fmtNum(lo)),
      svg("text", { x: L, y: H - 6 }, fmtTime(new Date(t0).toISOString())),
      svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, fmtTime(new Date(t1).toISOString())),
      svg("title", {}, `${pts.length} points; last ${fmtNum(pts[pts.length - 1][key])}`));
    root.replaceChildren(...nodes);
  }

  // ---------------------------------------------------------------- job events
  let eventsRetry = null;
  function connectEvents() {
    const conn = $("conn");
    if (events) events.close();
    clearTimeout(eventsRetry);
    const es = new EventSource("/events");
    events = es;
    const status = (stateName, text) => { conn.dataset.state = stateName; setText(conn, text); };
    status("connecting", "connecting…");
    es.onopen = () => status("open", "live");
    es.onerror = async () => {
      if (es.readyState !== EventSource.CLOSED) { status("connecting", "reconnecting…"); return; }
      // Refused (not a dropped connection, which EventSource retries by itself).
      const why = await diagnose("/events");
      if (events !== es) return;
      if (why && why.status === 401) { status("error", "signed out"); return; }   // the sign-in form reconnects
      status("error", `${why ? why.message : "disconnected"}; retrying in 5 s`);
      eventsRetry = setTimeout(connectEvents, 5000);
    };
    const parse = (ev) => {
      try {
        const msg = JSON.parse(ev.data);
        const at = parseTs(msg.at);
        if (Number.isFinite(at)) skewMs = Date.now() - at;
        return msg;
      } catch {
        return null;
      }
    };
    // hello: (re)connected; resync: we fell behind. Either way, re-read the state.
    const resync = () => { status("open", "live"); refreshJobs(); refreshOpenAll(); };
    es.addEventListener("hello", resync);
    es.addEventListener("resync", resync);
    es.addEventListener("job", (ev) => {
      const msg = parse(ev);
      if (!msg) return;
      const id = String(msg.job_id);
      const d = msg.data || {};
      const job = jobs.get(id);
      if (!job) { fetchJob(id); return; }
      const wasTerminal = TERMINAL.has(job.state);
      Object.assign(job, { state: d.state, reason: d.reason, world_size: d.world_size, name: d.name,
        restarts: d.restarts });
      if (d.state === "running" && !job.started_at) job.started_at = msg.at;
      if (TERMINAL.has(d.state)) {
        job.live = null;
        if (!wasTerminal) fetchJob(id, true);   // finished_at
      }
      renderJobs();
      if (open && open.id === id) {
        renderOpen();
        if (TERMINAL.has(d.state)) refreshOpenAll();
        else open.refreshSummary();
      }
    });
    es.addEventListener("worker", (ev) => {
      const msg = parse(ev);
      if (!msg || !open || open.id !== String(msg.job_id)) return;
      // Show the change at once, then read the whole summary.
      const d = msg.data || {};
      const w = open.summary && (open.summary.workers || []).find((x) => x.rank === d.rank);
      if (w) { Object.assign(w, { state: d.state, pid: d.pid, attempt: d.attempt }); renderRanks(); }
      if (d.state === "running") open.launched.set(d.rank, Math.max(open.launched.get(d.rank) ?? -1, d.attempt));
      open.refreshSummary();
      // A relaunch fills in its restart's restarted_at.
      if (open.restarts.some((r) => !r.restarted_at)) open.refreshRestarts();
    });
    es.addEventListener("straggler", (ev) => {
      const msg = parse(ev);
      if (open && open.id === String(msg && msg.job_id)) open.refreshSummary();
    });
    es.addEventListener("restart", (ev) => {
      const msg = parse(ev);
      if (!msg) return;
      const id = String(msg.job_id);
      const job = jobs.get(id);
      if (job && msg.data) { job.restarts = msg.data.restarts; renderJobs(); }
      if (open && open.id === id) {
        open.expectRestarts = Math.max(open.expectRestarts, (msg.data && msg.data.restarts) || 0);
        open.refreshRestarts();
        open.refreshSummary();
      }
    });
    es.addEventListener("checkpoint", (ev) => {
      const msg = parse(ev);
      if (!msg || !open || open.id !== String(msg.job_id)) return;
      if (msg.data && Number.isFinite(msg.data.step)) open.expectCheckpoint = Math.max(open.expectCheckpoint, msg.data.step);
      open.refreshCheckpoints();
      open.refreshSummary();
    });
    es.addEventListener("progress", (ev) => {
      const msg = parse(ev);
      if (!msg) return;
      const id = String(msg.job_id);
      const d = msg.data || {};
      pushPoint(id, { t: parseTs(msg.at), step: d.step, loss: d.loss, rate: d.steps_per_s });
      const job = jobs.get(id);
      if (job) {
        Object.assign(job, { step: d.step, progress: d.progress, live: d });
        const tr = $("jobs-body").querySelector(`tr[data-job-id="${CSS.escape(id)}"]`);
        if (tr) renderProgressCell(tr.children[2], job);
      }
      if (open && open.id === id) {
        renderOpen();
        // Per-rank steps and heartbeats are only in the summary: re-read it on progress, at
        // most once a second.
        if (performance.now() - open.summaryAsked > 1000) open.refreshSummary();
      }
    });
    es.addEventListener("deleted", (ev) => {
      const msg = parse(ev);
      if (!msg) return;
      const id = String(msg.job_id);
      jobs.delete(id);
      history.delete(id);
      renderJobs();
      if (open && open.id === id) {
        closeLogStream();
        open.missing = true;
        showJobError("This job was deleted.");
        renderOpenHeader();
      }
    });
  }

  // ---------------------------------------------------------------- logs
  // One EventSource per open job and rank filter. EventSource reconnects by itself after a
  // dropped connection and sends Last-Event-ID (the last seq); the server resumes after it.
  // Lines are still de-duplicated by seq, in case a replay overlaps what we showed.
  function openLogStream() {
    closeLogStream();
    if (!open) return;
    const rank = $("log-rank").value;
    const params = new URLSearchParams({ tail: String(LOG_TAIL) });
    if (rank !== "") params.set("rank", rank);
    const es = new EventSource(`/jobs/${open.id}/logs/stream?${params}`);
    const log = { es, lastSeq: -1, buffer: [], dropped: 0, ended: false, rank };
    open.log = log;
    $("log-lines").replaceChildren();
    logStatus();
    es.addEventListener("open", () => logStatus());
    es.addEventListener("error", async () => {
      if (log.ended) return;
      if (es.readyState !== EventSource.CLOSED) { logStatus("reconnecting…"); return; }
      const why = await diagnose(es.url);
      if (!open || open.log !== log) return;
      logStatus(`stream refused: ${why ? `${why.code}: ${why.message}` : "closed"}`);
    });
    es.addEventListener("log", (ev) => {
      let line;
      try { line = JSON.parse(ev.data); } catch { return; }
      if (!Number.isFinite(line.seq) || line.seq <= log.lastSeq) return;   // duplicate
      log.lastSeq = line.seq;
      if (log.paused) {
        log.buffer.push(line);
        if (log.buffer.length > MAX_BUFFERED) { log.buffer.shift(); log.dropped++; }
        logStatus();
      } else {
        queueLines([line]);
      }
    });
    es.addEventListener("lagged", (ev) => {
      let d = {};
      try { d = JSON.parse(ev.data); } catch { /* keep {} */ }
      appendNote(`fell behind the live stream (${d.missed ?? "some"} events); the missed lines follow from the history`);
    });
    es.addEventListener("end", (ev) => {
      let d = {};
      try { d = JSON.parse(ev.data); } catch { /* keep {} */ }
      log.ended = true;
      log.endState = d.state || null;
      es.close();   // otherwise EventSource would reconnect
      if (!log.paused) appendEnd(log);
      logStatus();
    });
  }

  function closeLogStream() {
    pendingLines = [];
    if (open && open.log) {
      open.log.es.close();
      open.log = null;
    }
  }

  function lineNode(l) {
    const who = l.rank === null || l.rank === undefined ? "server" : `r${l.rank}${l.attempt ? `.${l.attempt}` : ""}`;
    const t = parseTs(l.ts);
    const ts = Number.isFinite(t) ? new Date(t).toLocaleTimeString([], { hour12: false }) : "";
    return el("div", { class: "log-line", "data-seq": l.seq, "data-rank": l.rank ?? "", "data-stream": l.stream },
      el("span", { class: "ts", text: ts, title: l.ts }),
      el("span", { class: "who", text: who, title: `rank ${l.rank ?? "-"}, attempt ${l.attempt ?? "-"}, ${l.stream}` }),
      el("span", { class: "text", text: l.line }));
  }

  // Lines are added once per animation frame, so a replay of hundreds costs one layout.
  let pendingLines = [];
  let flushScheduled = false;
  function queueLines(lines) {
    for (const l of lines) pendingLines.push(l);
    if (pendingLines.length > MAX_LOG_LINES) pendingLines = pendingLines.slice(-MAX_LOG_LINES);
    if (!flushScheduled) {
      flushScheduled = true;
      requestAnimationFrame(flushLines);
    }
  }
  function flushLines() {
    flushScheduled = false;
    const lines = pendingLines;
    pendingLines = [];
    appendLines(lines);
  }

  function appendLines(lines) {
    if (!lines.length) return;
    const box = $("log-lines");
    const frag = document.createDocumentFragment();
    for (const l of lines.slice(-MAX_LOG_LINES)) frag.append(lineNode(l));
    box.append(frag);
    let extra = box.children.length - MAX_LOG_LINES;
    while (extra-- > 0) box.firstChild.remove();
    if (open && open.log && !open.log.paused) box.scrollTop = box.scrollHeight;
  }

  function appendNote(text) {
    flushLines();
    const box = $("log-lines");
    box.append(el("div", { class: "log-note", text: `— ${text} —` }));
    if (open && open.log && !open.log.paused) box.scrollTop = box.scrollHeight;
  }

  function appendEnd(log) {
    flushLines();
    const box = $("log-lines");
    if (box.querySelector(".log-end")) return;
    box.append(el("div", { id: "log-end", class: "log-end", "data-testid": "log-end", role: "status",
      text: `— end of log: the job is ${log.endState || "finished"} —` }));
    box.scrollTop = box.scrollHeight;
  }

  function logStatus(text) {
    const log = open && open.log;
    let s = text || "";
    if (!s && log) {
      if (log.ended) s = `ended (${log.endState || "finished"})`;
      else if (log.es.readyState === EventSource.OPEN) s = "live";
      else s = "connecting…";
      if (log.paused && log.buffer.length) s += ` · paused, ${log.buffer.length} new line${log.buffer.length === 1 ? "" : "s"} held`;
      else if (log.paused) s += " · paused";
      if (log.dropped) s += ` (${log.dropped} oldest dropped)`;
    }
    setText($("log-status"), s);
  }

  function setFollow(on) {
    const btn = $("log-follow");
    btn.setAttribute("aria-pressed", on ? "true" : "false");
    setText(btn, on ? "Following" : "Paused: resume");
    const log = open && open.log;
    if (!log) return;
    log.paused = !on;
    if (on) {
      const held = log.buffer;
      log.buffer = [];
      log.dropped = 0;
      flushLines();
      appendLines(held);
      if (log.ended) appendEnd(log);
      const box = $("log-lines");
      box.scrollTop = box.scrollHeight;
    }
    logStatus();
  }

  function syncRankFilter() {
    const sel = $("log-rank");
    const job = open && jobs.get(open.id);
    const n = (job && job.world_size) || (open && open.summary && open.summary.world_size) || 0;
    if (sel.options.length === n + 1) return;
    const current = sel.value;
    const opts = [el("option", { value: "", text: "all ranks" })];
    for (let r = 0; r < n; r++) opts.push(el("option", { value: String(r), text: `rank ${r}` }));
    sel.replaceChildren(...opts);
    sel.value = current;
  }

  // ---------------------------------------------------------------- stop / delete
  async function stopOpen() {
    if (!open) return;
    const id = open.id;
    const job = jobs.get(id) || {};
    if (!confirm(`Stop job ${jobLabel({ ...job, job_id: id })}? Every rank is terminated; a stopped job is not resumed.`)) return;
    const btn = $("stop-btn");
    btn.disabled = true;
    setText(btn, "Stopping…");
    try {
      const rec = await api("POST", `/jobs/${id}/stop`);
      upsertJob(rec);
      renderJobs();
      showJobError(null);
    } catch (e) {
      showJobError(`${e.code}: ${e.message}`);
    } finally {
      setText(btn, "Stop");
      if (open && open.id === id) { renderOpen(); refreshOpenAll(); }
    }
  }

  async function deleteOpen() {
    if (!open) return;
    const id = open.id;
    const job = jobs.get(id) || {};
    const running = !TERMINAL.has(job.state);
    const label = jobLabel({ ...job, job_id: id });
    const question = running
      ? `Job ${label} is ${job.state || "not finished"}. Stop it and delete it with all its records (logs, restarts, checkpoints index)?`
      : `Delete job ${label} and all its records (logs, restarts, checkpoints index)?`;
    if (!confirm(question)) return;
    try {
      await api("DELETE", `/jobs/${id}${running ? "?force=true" : ""}`);
      jobs.delete(id);
      history.delete(id);
      renderJobs();
      if (location.hash !== "#/") location.hash = "#/";
      else route();
    } catch (e) {
      showJobError(`${e.code}: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------- the form
  const NUMBER_FIELDS = [
    ["f-world-size", "world_size"],
    ["f-total-steps", "total_steps"],
    ["f-checkpoint-every", "checkpoint_every"],
    ["f-max-restarts", "max_restarts"],
    ["f-backoff", "backoff_initial_ms"],
  ];
  const FIELD_INPUT = {
    name: "f-name", world_size: "f-world-size", command: "f-command", total_steps: "f-total-steps",
    checkpoint_every: "f-checkpoint-every", restart_scope: "f-restart-scope", max_restarts: "f-max-restarts",
    backoff_initial_ms: "f-backoff",
  };

  class FormError extends Error {
    constructor(field, message) { super(message); this.field = field; }
  }

  // The spec the form describes; every field's problem at once (FormError.all).
  function buildSpec() {
    const spec = {};
    const errors = [];
    const name = $("f-name").value.trim();
    if (name) spec.name = name;
    for (const [inputId, key] of NUMBER_FIELDS) {
      const input = $(inputId);
      const raw = input.value.trim();
      if (input.validity.badInput) { errors.push(new FormError(key, `${key} must be a number`)); continue; }
      if (raw === "") continue;
      const n = Number(raw);
      if (!Number.isFinite(n)) errors.push(new FormError(key, `${key} must be a number`));
      else if (!Number.isInteger(n)) errors.push(new FormError(key, `${key} must be a whole number, got ${raw}`));
      else spec[key] = n;
    }
    try {
      buildCommand(spec);
    } catch (e) {
      if (!(e instanceof FormError)) throw e;
      errors.push(e);
    }
    if (errors.length) {
      const all = new FormError(errors[0].field, errors[0].message);
      all.all = errors;
      throw all;
    }
    const scope = $("f-restart-scope").value;
    if (scope) spec.restart_scope = scope;
    return spec;
  }

  function buildCommand(spec) {
    const worker = $("f-worker").value;
    const cmd = $("f-command").value.trim();
    if (worker === "shell") {
      if (!cmd) throw new FormError("command", "command: enter a shell line, or choose the built-in trainer");
      spec.command = ["sh", "-c", cmd];
    } else if (worker === "argv") {
      if (!cmd) throw new FormError("command", "command: enter a JSON array such as [\"python\", \"train.py\"]");
      try {
        spec.command = JSON.parse(cmd);
      } catch (e) {
        throw new FormError("command", `command is not valid JSON (${e.message}); enter an array such as ["python", "train.py"]`);
      }
    }
  }

  function clearFormError() {
    const box = $("form-error");
    box.hidden = true;
    box.replaceChildren();
    for (const p of document.querySelectorAll("#job-form .field-error")) p.remove();
    for (const id of Object.values(FIELD_INPUT)) {
      const input = $(id);
      input.removeAttribute("aria-invalid");
      const described = (input.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && !x.endsWith("-error"));
      if (described.length) input.setAttribute("aria-describedby", described.join(" "));
      else input.removeAttribute("aria-describedby");
    }
  }

  // Shows an error next to the field it names ("world_size must be …"), which is marked
  // invalid and (the first) focused; an error that names no field goes under the form.
  function showFormError(message, code, field, focus = true) {
    if (!field) {
      const m = /^([a-z_]+)\b/.exec(message);
      if (m && FIELD_INPUT[m[1]]) field = m[1];
      else {
        const f = /field `([a-z_]+)`/.exec(message);
        if (f && FIELD_INPUT[f[1]]) field = f[1];
      }
    }
    const input = field && FIELD_INPUT[field] && $(FIELD_INPUT[field]);
    if (input && !input.disabled) {
      const id = `${input.id}-error`;
      const p = el("p", { id, class: "field-error", "data-testid": "field-error", "data-field": field });
      if (code) p.append(el("span", { class: "code", text: code }));
      p.append(el("span", { class: "message", text: message }));
      (input.closest(".field") || input.parentElement).append(p);
      input.setAttribute("aria-invalid", "true");
      const described = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
      described.push(id);
      input.setAttribute("aria-describedby", described.join(" "));
      if (focus) input.focus();
      return;
    }
    const box = $("form-error");
    box.replaceChildren();
    if (code) box.append(el("span", { class: "code", text: code }));
    box.append(el("span", { class: "message", text: message }));
    box.hidden = false;
  }

  function syncWorkerField() {
    const worker = $("f-worker").value;
    const cmd = $("f-command");
    cmd.disabled = worker === "builtin";
    cmd.placeholder = worker === "shell" ? "i=0; while [ $i -lt 100 ]; do echo step $i; i=$((i+1)); sleep 1; done"
      : worker === "argv" ? "[\"python\", \"train.py\", \"--epochs\", \"3\"]"
        : "choose a shell line or argv above";
  }

  async function submitForm(ev) {
    ev.preventDefault();
    clearFormError();
    const status = $("form-status");
    let spec;
    try {
      spec = buildSpec();
    } catch (e) {
      (e.all || [e]).forEach((err, i) => showFormError(err.message, null, err.field, i === 0));
      setText(status, "");
      return;
    }
    const btn = $("f-submit");
    btn.disabled = true;
    setText(status, "Submitting…");
    try {
      const job = await api("POST", "/jobs", spec);
      upsertJob(job);
      renderJobs();
      setText(status, `Started ${job.name || shortId(job.job_id)}.`);
      location.hash = `#/jobs/${job.job_id}`;
    } catch (e) {
      setText(status, e.status ? `The server refused the job (HTTP ${e.status}).` : "");
      showFormError(e.message, e.code);
    } finally {
      btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------- sign-in
  // With --api-token, the API answers 401 until POST /session sets the session cookie
  // (HttpOnly, so this page never holds the token after sending it).
  function needSignIn(message) {
    signedOut = true;
    renderJobs();
    const box = $("signin");
    if (message) setText($("signin-why"), message);
    if (box.hidden) {
      box.hidden = false;
      $("signin-token").focus();
    }
  }

  async function signIn(ev) {
    ev.preventDefault();
    const err = $("signin-error");
    err.hidden = true;
    const input = $("signin-token");
    const btn = $("signin-submit");
    btn.disabled = true;
    try {
      await api("POST", "/session", { token: input.value });
      input.value = "";
      input.removeAttribute("aria-invalid");
      signedOut = false;
      renderJobs();
      $("signin").hidden = true;
      clearPageError();
      connectEvents();          // hello re-reads the jobs
      if (open) { refreshOpenAll(); openLogStream(); }
    } catch (e) {
      err.textContent = `${e.code}: ${e.message}`;
      err.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      btn.disabled = false;
    }
  }

  // ---------------------------------------------------------------- routing
  const JOB_ROUTE = /^#\/jobs\/([^/?#]+)\/?$/;
  function route() {
    const hash = location.hash || "#/";
    if (!hash.startsWith("#/")) return;   // in-page anchors
    const m = JOB_ROUTE.exec(hash);
    openJob(m ? decodeURIComponent(m[1]) : null);
  }

  // ---------------------------------------------------------------- start
  function start() {
    $("job-form").addEventListener("submit", submitForm);
    $("signin-form").addEventListener("submit", signIn);
    $("f-worker").addEventListener("change", syncWorkerField);
    syncWorkerField();
    $("stop-btn").addEventListener("click", stopOpen);
    $("delete-btn").addEventListener("click", deleteOpen);
    $("log-follow").addEventListener("click", () => {
      setFollow($("log-follow").getAttribute("aria-pressed") !== "true");
    });
    $("log-clear").addEventListener("click", () => { pendingLines = []; $("log-lines").replaceChildren(); });
    $("log-rank").addEventListener("change", () => { setFollow(true); openLogStream(); });
    $("page-error").addEventListener("click", clearPageError);
    document.querySelector(".skip").addEventListener("click", (ev) => {
      ev.preventDefault();
      $("job-view").focus();
    });
    window.addEventListener("hashchange", route);
    connectEvents();
    route();
    setInterval(renderAges, 1000);
  }

  start();
})();
