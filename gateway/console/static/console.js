// The console page: sign-in, then every 1.5 s a poll of the admin API (models, history deltas, cache, audit)
// redrawn in place. Cards are built once per model and updated, so a half-typed reason or an open evidence
// panel survives the refresh. Why polling and not server-sent events: see gateway/console/__init__.py.
"use strict";

const POLL_MS = 1500;
const HIDDEN_POLL_MS = 15000;  // a tab in the background polls ten times less, and catches up when shown

const fmt = {
  ms: (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) + " ms" : v.toFixed(1) + " ms"),
  pct: (v, digits) => (v === null || v === undefined ? "–" : (v * 100).toFixed(digits ?? 2) + "%"),
  rps: (v) => (v === null || v === undefined ? "–" : v.toFixed(1) + "/s"),
  dur(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
};

function h(tag, props, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "dataset") Object.assign(n.dataset, v);
    else if (k === "text") n.textContent = v;
    else n[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return n;
}

function facts(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v, id]) => [h("dt", { text: k }), h("dd", { text: v, dataset: id ? { testid: id } : {} })]));
}

const Views = {
  policy(p) {
    const stages = (p.stages || []).map((s, i) => h("li", {
      text: `stage ${i + 1}: ${s.weight}% for ${fmt.dur(s.hold_s)}` +
        (s.approvals && s.approvals.length ? `, then approval by ${s.approvals.join(", ")}` : s.approve ? ", then an operator's resume" : "") +
        (s.confirm_url ? `, then the confirm gate ${s.confirm_url}` : ""),
    }));
    const full = "then 100% (promote)" + (p.promote_confirm_url ? `, once the confirm gate ${p.promote_confirm_url} says yes` : "");
    return h("div", {}, h("ol", { className: "stages" }, ...stages, h("li", { text: full })),
      h("p", { className: "muted", text: `analysed every ${fmt.dur(p.interval_s)}; rolls back when the error rate's ` +
        `lower bound > ${fmt.pct(p.max_error_rate, 3)} (confidence ${p.confidence}), p95 > ${p.max_p95_ms} ms on ` +
        `≥ ${p.min_requests} requests, accuracy drops > ${p.max_accuracy_drop}` +
        (p.min_shadow_agreement !== null ? `, shadow agreement < ${p.min_shadow_agreement}` : "") +
        `, or ${p.max_no_data_intervals} intervals without candidate requests` }));
  },

  // What the rollout waits for before its next step, in an on-call engineer's words.
  waitsFor(c) {
    const stage = c.policy.stages[c.stage - 1];
    if (c.phase === "paused") {
      if (c.paused_by === "approval") return c.waiting_for.length ? "approval: " + c.waiting_for.join(", ") : "an operator's resume (approval)";
      if (c.paused_by === "operator") return "an operator's resume";
      return "the breach to clear (the stable color breaches too)";
    }
    if (c.phase === "promoting") return "one clean analysis at 100%, then the colors swap";
    if (c.phase !== "progressing" || !stage) return "nothing: no rollout is running";
    // The controller's own words for what is missing (its last "hold"), the hold time left, the next analysis
    // and the approvals after the stage: the page does not re-derive the analysis rules.
    const parts = [];
    const serverNow = c.stage_started + (c.time_in_stage_s || 0);
    const left = stage.hold_s - (c.time_in_stage_s || 0);
    if (left > 0) parts.push(`time: ${fmt.dur(left)} of hold left`);
    const d = c.last_decision;
    // A hold at a confirm gate is a wait for another system, not for evidence: its reason is shown as it is.
    if (d && d.result === "hold") parts.push((d.evidence && d.evidence.confirm_gate ? "" : "evidence: ") + d.reason);
    else parts.push(`the first analysis of this stage, in ${fmt.dur(c.last_analysis + c.policy.interval_s - serverNow)}`);
    if (stage.approvals.length) parts.push("then approval: " + stage.approvals.join(", "));
    else if (stage.approve) parts.push("then an operator's resume");
    if (stage.confirm_url) parts.push("then the confirm gate " + stage.confirm_url);
    return parts.join("; ");
  },

  rollout(dl, m) {
    const c = m.canary, active = ["progressing", "paused", "promoting"].includes(c.phase);
    const n = c.stages;
    const stage = c.stage === 0 ? "–" : c.stage > n ? `promoting (past stage ${n} of ${n})` : `${c.stage} of ${n}`;
    const cur = c.policy.stages[c.stage - 1];
    const hold = active && cur ? Math.max(0, cur.hold_s - (c.time_in_stage_s || 0)) : null;
    facts(dl, [
      ["Phase", c.phase.replace("_", " ") + (c.paused_by ? ` (by ${c.paused_by})` : ""), "phase-text"],
      ["Candidate", `${c.candidate} → ${m.weights[c.candidate] ?? "–"}%`],
      ["Stage", stage, "stage"],
      ["Time in stage", active ? fmt.dur(c.time_in_stage_s) : "–"],
      ["Hold remaining", hold === null ? "–" : fmt.dur(hold)],
      ["Next step waits for", this.waitsFor(c), "waits-for"],
    ]);
  },

  decision(box, c, open) {
    const d = c.last_decision;
    if (!d) { box.replaceChildren(h("p", { className: "muted", text: "No decision yet." })); return; }
    const head = h("p", {}, h("strong", { className: "result-" + d.result, text: d.result, dataset: { testid: "decision-result" } }),
      ` at ${fmt.time(d.time)}: `, h("span", { text: d.reason, dataset: { testid: "decision-reason" } }));
    box.replaceChildren(head, this.evidence(d.evidence, open));
  },

  evidence(ev, open) {
    const details = h("details", { open: !!open });
    details.appendChild(h("summary", { text: "Evidence and thresholds" }));
    if (ev && ev.candidate && typeof ev.candidate === "object") {
      const rows = [["requests", "requests", String], ["errors", "errors", String],
        ["error rate", "error_rate", (v) => fmt.pct(v, 3)], ["error rate, lower bound", "error_rate_lower_bound", (v) => fmt.pct(v, 3)],
        ["p95", "p95_ms", fmt.ms], ["requests in window", "window_requests", String],
        ["accuracy", "accuracy", (v) => (v === null ? "no data" : v.toFixed(3))], ["feedback", "feedback", String]];
      const t = ev.thresholds || {};
      const limit = { error_rate_lower_bound: "max " + fmt.pct(t.max_error_rate, 3), p95_ms: "max " + t.max_p95_ms + " ms",
                      requests: "min " + t.min_requests, accuracy: "max drop " + t.max_accuracy_drop };
      const table = h("table", { className: "evidence", dataset: { testid: "evidence" } },
        h("thead", {}, h("tr", {}, h("th", { text: "" }), h("th", { text: "candidate" }), h("th", { text: "stable" }), h("th", { text: "threshold" }))),
        h("tbody", {}, ...rows.map(([label, key, f]) => h("tr", { dataset: { row: key } }, h("th", { text: label }),
          h("td", { text: ev.candidate[key] === undefined || ev.candidate[key] === null ? "–" : f(ev.candidate[key]) }),
          h("td", { text: ev.stable[key] === undefined || ev.stable[key] === null ? "–" : f(ev.stable[key]) }),
          h("td", { text: limit[key] || "" })))));
      details.appendChild(table);
      const extra = [`confidence ${t.confidence}`, `quality: ${ev.quality ?? "–"}`,
        `shadow: ${ev.shadow && ev.shadow.agreement !== null && ev.shadow ? fmt.pct(ev.shadow.agreement, 1) + " of " + ev.shadow.samples : "no data"}`,
        `candidate breaker ${ev.candidate.breaker_open ? "open" : "closed"}`];
      details.appendChild(h("p", { className: "muted", text: extra.join(" · ") }));
    } else {
      details.appendChild(h("pre", { text: JSON.stringify(ev, null, 1) }));
    }
    return details;
  },

  colors(box, m, now) {
    const rows = ["blue", "green"].map((color) => {
      const c = m.colors[color], p = (now && now[color]) || {};
      const backends = h("ul", { className: "backends" }, ...c.backends.map((b) =>
        h("li", {}, h("span", { className: "breaker " + b.breaker, text: b.breaker, dataset: { testid: "breaker" } }), " " + b.url)));
      return h("tr", { dataset: { color } },
        h("th", {}, h("span", { className: "dot " + color }), " " + color + (m.stable === color ? " (stable)" : " (candidate)")),
        h("td", { text: c.version }), h("td", { text: m.weights[color] + "%" }),
        h("td", { text: fmt.ms(p.p50_ms) }), h("td", { text: fmt.ms(p.p95_ms), dataset: { testid: "p95" } }),
        h("td", { text: fmt.ms(p.p99_ms) }),
        h("td", { text: fmt.pct(p.error_rate) }), h("td", { text: fmt.rps(p.rps) }),
        h("td", { text: p.accuracy === null || p.accuracy === undefined ? "no feedback" : `${p.accuracy.toFixed(3)} (${p.feedback})` }),
        h("td", {}, backends));
    });
    box.replaceChildren(h("div", { className: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ...["color", "version", "weight", "p50", "p95", "p99", "errors", "requests/s", "online accuracy",
        "backends (breaker)"]
        .map((t) => h("th", { text: t })))), h("tbody", {}, ...rows))));
  },
};

const App = {
  me: null, cards: new Map(), history: new Map(), audit: [], cache: null, timer: null, openAudit: new Set(),
  busy: false, again: false,

  init() {
    document.getElementById("sign-in-form").addEventListener("submit", (ev) => { ev.preventDefault(); this.signIn(); });
    document.getElementById("sign-out").addEventListener("click", () => this.signOut(""));
    for (const id of ["filter-model", "filter-actor", "filter-action"]) {
      document.getElementById(id).addEventListener("change", () => this.renderAudit());
    }
    document.addEventListener("visibilitychange", () => { if (!document.hidden && this.me) this.refresh(); });
    if (Api.token()) this.start();
  },

  async signIn() {
    const input = document.getElementById("token");
    Api.setToken(input.value.trim());
    input.value = "";
    await this.start();
  },

  async start() {
    const who = await Api.whoami();
    const error = document.getElementById("sign-in-error");
    if (!who.ok) {
      Api.forget();
      error.textContent = who.status === 401 ? `The gateway refused this token: ${who.error}.`
        : who.status === 429 ? `Too many refused tokens from this address: ${who.error}`
        : `Sign-in failed (${who.status}): ${who.error}`;
      return;
    }
    error.textContent = "";
    this.me = who.doc;
    document.getElementById("sign-in").hidden = true;
    document.getElementById("who").hidden = false;
    document.getElementById("audit").hidden = false;
    document.getElementById("who-text").textContent = `${this.me.name} (${this.me.roles.join(", ")})`;
    await this.refresh();
  },

  signOut(message) {
    Api.forget();
    clearTimeout(this.timer);
    this.me = null;
    this.cards.clear();
    this.history.clear();
    document.getElementById("models").replaceChildren();
    document.getElementById("sign-in").hidden = false;
    document.getElementById("who").hidden = true;
    document.getElementById("audit").hidden = true;
    document.getElementById("sign-in-error").textContent = message;
  },

  // One poll at a time: a refresh asked for while one runs (after a write, a tab shown again) runs right after it.
  async refresh() {
    if (this.busy) { this.again = true; return; }
    this.busy = true;
    try { await this.poll(); } finally { this.busy = false; }
    if (this.again) { this.again = false; this.refresh(); }
  },

  async poll() {
    clearTimeout(this.timer);
    if (!this.me) return;
    const banner = document.getElementById("fetch-error");
    const models = await Api.models();
    if (models.status === 401) { this.signOut(`Signed out: ${models.error}`); return; }
    if (models.ok) {
      const [cache, audit, ...histories] = await Promise.all([Api.cache(), Api.audit(200),
        ...models.doc.models.map((m) => Api.history(m.name, this.lastTime(m.name)))]);
      if (!this.me) return;  // signed out meanwhile
      models.doc.models.forEach((m, i) => this.mergeHistory(m.name, histories[i]));
      this.cache = cache.ok ? cache.doc : null;
      if (audit.ok) this.audit = audit.doc.entries;
      for (const m of models.doc.models) this.renderModel(m);
      this.renderAudit();
      banner.hidden = true;
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } else {
      banner.hidden = false;
      banner.textContent = `The admin API answered ${models.status}: ${models.error}`;
    }
    this.timer = setTimeout(() => this.refresh(), document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  },

  lastTime(name) {
    const h = this.history.get(name);
    return h && h.points.length ? h.points[h.points.length - 1].t : null;
  },

  mergeHistory(name, answer) {
    if (!answer.ok) return;
    const held = this.history.get(name);
    const doc = answer.doc;
    if (held) {
      held.points.push(...doc.points);
      const cutoff = doc.now.t - doc.span_s;
      while (held.points.length && held.points[0].t < cutoff) held.points.shift();
      Object.assign(held, { now: doc.now, thresholds: doc.thresholds, window_s: doc.window_s });
    } else {
      this.history.set(name, doc);
    }
  },

  card(m) {
    let card = this.cards.get(m.name);
    if (card) return card;
    const root = document.getElementById("model-template").content.firstElementChild.cloneNode(true);
    root.dataset.model = m.name;
    root.querySelector(".model-name").textContent = m.name;
    root.setAttribute("aria-label", "model " + m.name);
    document.getElementById("models").appendChild(root);
    card = { root, controls: Controls.build(root.querySelector(".controls"), m.name, this.me, this) };
    this.cards.set(m.name, card);
    return card;
  },

  renderModel(m) {
    const card = this.card(m), root = card.root, hist = this.history.get(m.name);
    root.querySelector(".phase-badge").textContent = m.canary.phase.replace("_", " ");
    root.querySelector(".phase-badge").className = "phase-badge " + m.canary.phase;
    root.dataset.phase = m.canary.phase;
    const bar = root.querySelector(".weights");
    bar.setAttribute("aria-label", `weights: blue ${m.weights.blue}%, green ${m.weights.green}%`);
    for (const color of ["blue", "green"]) {
      const seg = bar.querySelector(".bar." + color);
      seg.style.flexGrow = String(m.weights[color]);
      seg.dataset.weight = m.weights[color];
      seg.querySelector("span").textContent = m.weights[color] ? `${color} ${m.weights[color]}%` : "";
    }
    Views.rollout(root.querySelector(".rollout dl"), m);
    const box = root.querySelector(".decision-body");
    const d = m.canary.last_decision, key = d ? `${d.time}|${d.result}|${d.reason}` : "none";
    if (box.dataset.key !== key) {  // redrawn only when it changed: keyboard focus and an open panel stay
      const open = box.querySelector("details") ? box.querySelector("details").open : false;
      Views.decision(box, m.canary, open);
      box.dataset.key = key;
    }
    if (hist) this.renderCharts(root.querySelector(".charts"), hist);
    Views.colors(root.querySelector(".color-table"), m, hist && hist.now);
    const c = this.cache;
    const hits = c && c.enabled ? (c.l1_hits || 0) + (c.l2_hits || 0) : 0;
    const looked = c && c.enabled ? hits + (c.misses || 0) : 0;
    const shadow = hist ? hist.now.shadow : null;
    facts(root.querySelector(".signals dl"), [
      ["Cache hit ratio (all models)", !c || !c.enabled ? "cache off" : looked ? `${fmt.pct(hits / looked, 1)} of ${looked}` : "no lookups yet", "cache"],
      ["Shadow share", m.shadow_percent + "%"],
      ["Shadow agreement", shadow && shadow.agreement !== null ? `${fmt.pct(shadow.agreement, 1)} of ${shadow.compared}` : "no comparisons", "shadow"],
      ["ETag", m.etag],
    ]);
    card.controls.update(m);
  },

  // The charts draw the history's points (one per BLUEGREEN_HISTORY_INTERVAL_S) and are redrawn only when a new
  // one arrives; the live numbers of every poll are in the colors table. Redrawing three charts every 1.5 s
  // cost the browser's machine measurably more than the table.
  renderCharts(box, hist) {
    const points = hist.points;
    const key = (points.length ? points[points.length - 1].t : 0) + "|" + points.length + "|" + JSON.stringify(hist.thresholds);
    if (box.dataset.key === key || !points.length) return;
    box.dataset.key = key;
    const series = (metric, scale) => ["blue", "green"].map((color) => ({
      label: `${color} ${metric.replace("_ms", "").replace("_", " ")}`, cls: `${color} m-${metric}`,
      points: points.map((p) => [p.t, p[color][metric] === null ? null : p[color][metric] * (scale || 1)]),
    }));
    const lat = ["p50_ms", "p95_ms", "p99_ms"].flatMap((q) => series(q));
    if (box.children.length !== 3) box.replaceChildren(h("figure"), h("figure"), h("figure"));
    const [a, b, c] = box.children;
    const w = fmt.dur(hist.window_s);
    Charts.draw(a, { title: `Latency p50 / p95 / p99 (ms, over ${w})`, format: (v) => v.toFixed(v < 10 ? 1 : 0), series: lat,
                     threshold: { value: hist.thresholds.max_p95_ms, label: "p95 limit" } });
    Charts.draw(b, { title: `Error rate (%, over ${w})`, format: (v) => v.toFixed(v < 1 ? 2 : 1), series: series("error_rate", 100),
                     threshold: { value: hist.thresholds.max_error_rate * 100, label: "limit" } });
    Charts.draw(c, { title: `Requests/s (over ${w})`, format: (v) => v.toFixed(v < 10 ? 1 : 0), series: series("rps"), threshold: null });
  },

  renderAudit() {
    const pick = (id) => document.getElementById(id).value;
    const fill = (id, values) => {
      const sel = document.getElementById(id), keep = sel.value;
      const want = ["", ...[...new Set(values)].filter(Boolean).sort()];
      if ([...sel.options].map((o) => o.value).join("\n") !== want.join("\n")) {
        sel.replaceChildren(...want.map((v) => h("option", { value: v, text: v || "all" })));
        sel.value = want.includes(keep) ? keep : "";
      }
    };
    fill("filter-model", this.audit.map((e) => e.model));
    fill("filter-actor", this.audit.map((e) => e.who));
    fill("filter-action", this.audit.map((e) => e.action));
    const [model, actor, action] = [pick("filter-model"), pick("filter-actor"), pick("filter-action")];
    const shown = this.audit.filter((e) => (!model || e.model === model) && (!actor || e.who === actor) && (!action || e.action === action));
    const list = document.getElementById("audit-list");
    const key = [model, actor, action, shown.length, shown.length ? shown[0].time : 0].join("|");
    if (list.dataset.key === key) return;  // unchanged: keep focus and open panels as they are
    list.dataset.key = key;
    list.replaceChildren(...shown.map((e) => {
      const key = `${e.time}|${e.who}|${e.action}`;
      const item = h("li", { dataset: { action: e.action, who: e.who, model: e.model || "" } },
        h("time", { text: fmt.time(e.time), title: e.time_iso }), " ",
        h("strong", { text: e.action }), ` ${e.model || ""} by ${e.who}` + (e.roles && e.roles.length ? ` (${e.roles.join(", ")})` : ""),
        e.reason ? h("q", { text: e.reason }) : null,
        e.new && Object.keys(e.new).length ? h("code", { text: JSON.stringify(e.old) + " → " + JSON.stringify(e.new) }) : null);
      if (e.evidence) {
        const d = Views.evidence(e.evidence, this.openAudit.has(key));
        d.addEventListener("toggle", () => { if (d.open) this.openAudit.add(key); else this.openAudit.delete(key); });
        item.appendChild(d);
      }
      return item;
    }));
    if (!shown.length) list.replaceChildren(h("li", { className: "muted", text: "No entries match." }));
  },
};

document.addEventListener("DOMContentLoaded", () => App.init());
