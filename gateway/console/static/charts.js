// Small SVG line charts, written for this console: time on x, one path per series (a gap where a value is
// missing), a dashed line where the policy's threshold is, and a legend in HTML with each series' newest value.
// The newest value is also on the path as data-last, so a test reads exactly what is drawn.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 380, H = 170, LEFT = 40, RIGHT = 6, TOP = 10, BOTTOM = 20;

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 5);
  }

  // A round upper bound for the y axis: 1, 2 or 5 times a power of ten.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // spec: {title, format(v) -> text, series: [{label, cls, points: [[t, v|null]]}], threshold: {value, label}}
  function draw(figure, spec) {
    figure.replaceChildren();
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = spec.title;
    figure.appendChild(caption);

    const all = spec.series.flatMap((s) => s.points);
    const times = all.map((p) => p[0]);
    const t1 = times.length ? Math.max(...times) : Date.now() / 1000;
    const t0 = Math.min(times.length ? Math.min(...times) : t1 - 60, t1 - 60);
    const values = all.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
    const limit = spec.threshold && spec.threshold.value !== null ? spec.threshold.value : null;
    const top = niceMax(Math.max(0, ...values, limit !== null ? limit * 1.1 : 0));
    const x = (t) => LEFT + ((t - t0) / Math.max(1e-9, t1 - t0)) * (W - LEFT - RIGHT);
    const y = (v) => TOP + (1 - v / top) * (H - TOP - BOTTOM);

    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title });
    el("title", {}, svg).textContent = spec.title;
    for (const frac of [0, 0.5, 1]) {
      el("line", { x1: LEFT, x2: W - RIGHT, y1: y(top * frac), y2: y(top * frac), class: "grid" }, svg);
      el("text", { x: LEFT - 4, y: y(top * frac) + 4, class: "axis", "text-anchor": "end" }, svg)
        .textContent = spec.format(top * frac);
    }
    el("text", { x: LEFT, y: H - 6, class: "axis" }, svg).textContent = clock(t0);
    el("text", { x: W - RIGHT, y: H - 6, class: "axis", "text-anchor": "end" }, svg).textContent = clock(t1);
    if (limit !== null) {
      el("line", { x1: LEFT, x2: W - RIGHT, y1: y(limit), y2: y(limit), class: "threshold",
                   "data-threshold": limit }, svg);
      el("text", { x: W - RIGHT - 2, y: y(limit) - 3, class: "axis threshold-label", "text-anchor": "end" }, svg)
        .textContent = spec.threshold.label + " " + spec.format(limit);
    }

    const legend = document.createElement("ul");
    legend.className = "legend";
    for (const s of spec.series) {
      let d = "", pen = false, last = null;
      for (const [t, v] of s.points) {
        if (v === null || v === undefined) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = true;
        last = v;
      }
      const path = el("path", { d: d.trim() || "M0 0", class: "series " + s.cls, "data-series": s.label,
                                "data-last": last === null ? "" : last, "data-points": s.points.length }, svg);
      el("title", {}, path).textContent = s.label;
      const item = document.createElement("li");
      item.className = s.cls;
      item.dataset.series = s.label;
      item.textContent = s.label + " " + (last === null ? "–" : spec.format(last));
      legend.appendChild(item);
    }
    figure.appendChild(svg);
    figure.appendChild(legend);
  }

  return { draw };
})();
