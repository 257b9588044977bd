// The controls of one model card: set weights, start (with the policy shown first), pause, resume, promote,
// abort, approve. Which of them exist follows the token's roles (the API judges every write anyway); each asks
// for a reason, sends the model's current ETag, and shows either the audit entry the write produced or the
// API's error as written, with a sentence on what a 409 or 412 means here.
"use strict";

const Controls = (() => {
  const RANK = { viewer: 0, operator: 1, admin: 2 };

  function may(roles, role) {
    if (roles.includes(role)) return true;
    const need = RANK[role];
    return need !== undefined && roles.some((r) => (RANK[r] ?? -1) >= need);
  }

  function node(tag, props, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "dataset") Object.assign(n.dataset, v);
      else if (k === "text") n.textContent = v;
      else n[k] = v;
    }
    for (const c of children) if (c) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return n;
  }

  function field(label, input) {
    const id = "f" + Math.random().toString(36).slice(2, 9);
    input.id = id;
    return node("div", { className: "field" }, node("label", { htmlFor: id, text: label }), input);
  }

  const EXPLAIN = {
    409: "The gateway refused this in the model's current state. While a rollout runs it owns the weights: abort " +
         "it (or let it finish) before setting weights by hand.",
    412: "Someone changed this model after the page read it (stale ETag). The page has the new state now: " +
         "check it and try again.",
    403: "Your token's roles do not allow this.",
  };

  function describeEntry(e) {
    const change = e.new && Object.keys(e.new).length ? " " + JSON.stringify(e.old) + " → " + JSON.stringify(e.new)
      : "";
    return `${e.time_iso} ${e.who} ${e.action}${e.model ? " " + e.model : ""}` +
      (e.reason ? ` — “${e.reason}”` : "") + change;
  }

  // Build the controls once per model card; `update(model)` keeps them in step with each poll.
  function build(panel, name, me, ctx) {
    panel.replaceChildren();
    const roles = me.roles;
    const result = node("div", { className: "result", role: "status", dataset: { testid: "result" } });
    const steer = may(roles, "operator"), admin = may(roles, "admin");
    const approver = roles.some((r) => r.startsWith("approve:"));
    if (!steer && !approver) {
      panel.appendChild(node("p", { className: "muted", text: `Read-only: ${me.name} holds ${roles.join(", ")}.` }));
      return { update() {} };
    }
    panel.appendChild(node("h3", { text: "Controls" }));
    let current = null;  // the model's latest document (etag, weights, canary)

    async function act(what, call) {
      result.className = "result";
      result.textContent = what + "…";
      const answer = await call();
      if (!answer.ok) {
        result.className = "result error";
        result.replaceChildren(node("strong", { text: `Refused (${answer.status}): ` }),
          node("span", { className: "api-error", dataset: { testid: "api-error" }, text: answer.error }));
        if (EXPLAIN[answer.status]) result.appendChild(node("p", { text: EXPLAIN[answer.status] }));
        ctx.refresh();
        return false;
      }
      const audit = await Api.audit(50);
      const entry = audit.ok ? audit.doc.entries.find((e) => e.who === me.name && e.model === name) : null;
      result.className = "result ok";
      result.replaceChildren(node("strong", { text: "Done. Audit entry: " }),
        node("span", { dataset: { testid: "audit-entry" }, text: entry ? describeEntry(entry) : "(not found)" }));
      ctx.refresh();
      return true;
    }

    // A confirmation area under the buttons: a reason (required), optional extra content, Confirm and Cancel.
    const confirmBox = node("div", { className: "confirm", hidden: true });
    function ask(title, extra, onConfirm) {
      const reason = node("input", { type: "text", required: true, maxLength: 500, placeholder: "why (audited)" });
      reason.dataset.testid = "reason";
      const ok = node("button", { type: "submit", text: "Confirm", dataset: { control: "confirm" } });
      const cancel = node("button", { type: "button", text: "Cancel" });
      const form = node("form", {}, node("h4", { text: title }), extra || null, field("Reason", reason), ok, cancel);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        ok.disabled = true;
        const done = await onConfirm(reason.value.trim());
        ok.disabled = false;
        if (done !== false) confirmBox.hidden = true;
      });
      cancel.addEventListener("click", () => { confirmBox.hidden = true; });
      confirmBox.replaceChildren(form);
      confirmBox.hidden = false;
      reason.focus();
    }

    // ---- weights (operator)
    let green = null;
    if (steer) {
      green = node("input", { type: "number", min: 0, max: 100, step: 1, required: true });
      green.dataset.testid = "green-weight";
      const blueText = node("output", { className: "muted" });
      green.addEventListener("input", () => {
        green.dataset.dirty = "1";  // typed by the operator: the poll no longer overwrites it
        blueText.textContent = `blue ${100 - Number(green.value || 0)}%`;
      });
      const reason = node("input", { type: "text", required: true, maxLength: 500, placeholder: "why (audited)" });
      reason.dataset.testid = "weights-reason";
      const form = node("form", { className: "inline-form" },
        field("Green weight %", green), blueText, field("Reason", reason),
        node("button", { type: "submit", text: "Set weights", dataset: { control: "set-weights" } }));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const g = Number(green.value);
        const ok = await act("Setting weights", () => Api.split(name, current.etag, 100 - g, g, reason.value.trim()));
        if (ok) { reason.value = ""; delete green.dataset.dirty; }
      });
      panel.appendChild(node("div", { className: "control-group" }, node("h4", { text: "Weights" }), form));
    }

    // ---- rollout commands
    const buttons = {};
    const row = node("div", { className: "buttons" });
    const command = (key, label, role, handler) => {
      if (!may(roles, role)) return;
      const b = node("button", { type: "button", text: label, dataset: { control: key } });
      b.addEventListener("click", handler);
      buttons[key] = b;
      row.appendChild(b);
    };
    const simple = (cmd, label) => () => ask(`${label} the rollout of ${name}`, null,
      (reason) => act(label, () => Api.canary(name, current.etag, cmd, { reason })));
    command("start", "Start rollout…", "admin", startDialog);
    command("pause", "Pause", "operator", simple("pause", "Pause"));
    command("resume", "Resume", "operator", simple("resume", "Resume"));
    command("promote", "Promote", "admin", simple("promote", "Promote"));
    command("abort", "Abort", "operator", simple("abort", "Abort"));
    const approvals = node("span", { className: "approvals" });
    row.appendChild(approvals);
    panel.appendChild(node("div", { className: "control-group" }, node("h4", { text: "Rollout" }), row));
    panel.appendChild(confirmBox);
    panel.appendChild(result);

    async function startDialog() {
      const base = await Api.policy(name);
      if (!base.ok) {
        result.className = "result error";
        result.textContent = `Refused (${base.status}): ${base.error}`;
        return;
      }
      const text = node("textarea", { rows: 8, spellcheck: false, value: JSON.stringify(base.doc, null, 1) });
      text.dataset.testid = "policy";
      const preview = node("div", { className: "policy-preview", dataset: { testid: "policy-preview" } });
      const force = node("input", { type: "checkbox" });
      force.dataset.testid = "force";
      const show = () => {
        let p;
        try { p = JSON.parse(text.value); } catch (exc) { preview.textContent = "not JSON: " + exc.message; return; }
        // The gateway applies what is written here on top of the routing file's policy: preview the same.
        preview.replaceChildren(Views.policy({ ...base.doc, ...p }));
      };
      text.addEventListener("input", show);
      show();
      const forceLabel = node("label", { className: "check" }, force, " force (start without a passing validation report)");
      const extra = node("div", {}, node("p", { text: `Candidate: ${current.candidate} (now at ` +
        `${current.weights[current.candidate]}%), version ${current.colors[current.candidate].version}.` }),
        preview, field("Policy (JSON: the routing file's, edit to override)", text), forceLabel);
      ask(`Start a rollout of ${name}`, extra, (reason) => {
        let policy;
        try { policy = JSON.parse(text.value); } catch (exc) {
          result.className = "result error";
          result.textContent = "The policy is not JSON: " + exc.message;
          return false;
        }
        return act("Starting", () => Api.canary(name, current.etag, "start", { reason, force: force.checked, policy }));
      });
    }

    function update(model) {
      current = model;
      const c = model.canary, active = ["progressing", "paused", "promoting"].includes(c.phase);
      if (green && !green.dataset.dirty && document.activeElement !== green) green.value = model.weights.green;
      const state = { start: !active, pause: c.phase === "progressing" || c.phase === "promoting",
                      resume: c.phase === "paused", promote: active, abort: active };
      for (const [k, b] of Object.entries(buttons)) b.disabled = !state[k];
      const gates = (c.waiting_for || []).filter((g) => roles.includes("approve:" + g));
      const have = [...approvals.children].map((b) => b.dataset.gate).join(",");
      if (have !== gates.join(",")) {
        approvals.replaceChildren(...gates.map((g) => {
          const b = node("button", { type: "button", text: `Approve ${g}`, dataset: { control: "approve", gate: g } });
          b.addEventListener("click", () => ask(`Approve the ${g} gate of ${name}`, null,
            (reason) => act("Approving", () => Api.canary(name, current.etag, "approve", { gate: g, reason }))));
          return b;
        }));
      }
    }
    return { update };
  }

  return { build, may, describeEntry };
})();
