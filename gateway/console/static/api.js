// The admin API as the console calls it: the token from this tab's session storage, sent as a bearer token.
// Every answer comes back as {status, ok, doc, etag, error}; `error` is the API's own words ({"error": ...}),
// shown to the operator as written.
"use strict";

const Api = (() => {
  const KEY = "bluegreen.token";

  function token() { return sessionStorage.getItem(KEY); }
  function setToken(value) { sessionStorage.setItem(KEY, value); }
  function forget() { sessionStorage.removeItem(KEY); }

  async function call(method, path, body, headers) {
    const init = { method, headers: { authorization: "Bearer " + (token() || ""), ...(headers || {}) } };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (exc) {
      return { status: 0, ok: false, doc: null, etag: null, error: "the gateway did not answer: " + exc.message };
    }
    let doc = null;
    const text = await response.text();
    try { doc = text ? JSON.parse(text) : null; } catch (_) { doc = null; }
    const error = response.ok ? null : (doc && typeof doc.error === "string" ? doc.error : text || response.statusText);
    return { status: response.status, ok: response.ok, doc, etag: response.headers.get("etag"), error };
  }

  const model = (m) => "/admin/v1/models/" + encodeURIComponent(m);
  return {
    token, setToken, forget, call,
    whoami: () => call("GET", "/admin/v1/whoami"),
    models: () => call("GET", "/admin/v1/models"),
    stats: (m) => call("GET", model(m) + "/stats"),
    shadow: (m) => call("GET", model(m) + "/shadow"),
    history: (m, since) => call("GET", model(m) + "/history" + (since ? "?since=" + since : "")),
    policy: (m) => call("GET", model(m) + "/policy"),
    cache: () => call("GET", "/admin/v1/cache"),
    audit: (limit) => call("GET", "/admin/v1/audit?limit=" + (limit || 200)),
    split: (m, etag, blue, green, reason) =>
      call("PUT", model(m) + "/split", { blue, green, reason }, { "if-match": etag }),
    canary: (m, etag, command, body) => call("POST", model(m) + "/canary/" + command, body, { "if-match": etag }),
  };
})();
