"""The ``gateway`` suite: gateway vs direct to the model server vs nginx, throughput and CPU per request at
saturation, added latency at half load."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np

from loadtests.bench import base, servers, steps, wrk
from loadtests.bench.base import fmt_added, fmt_cores, fmt_int, fmt_ms, fmt_ms2, fmt_share
from loadtests.bench.variants import cpu_medians, notify_ratios, notify_runs, render_notify, variant_runs, variant_table
from serving.machine import machine_line

#: Order of the wrk runs, one tuple per round: alternating, so drift on the shared machine favours neither side.
GATEWAY_ROUNDS = (("direct", "gateway", "nginx"), ("nginx", "gateway", "direct"), ("direct", "nginx", "gateway"))
#: Order of the fixed-rate runs (ABBA): the added latency is median(gateway) − median(direct) per percentile.
HALF_LOAD_ORDER = ("direct", "gateway", "gateway", "direct")
GENERATOR_LAG_WARN_MS = 5.0
TARGET_GATEWAY_VS_DIRECT = 0.6
STRETCH_GATEWAY_VS_DIRECT = 0.75
TARGET_GATEWAY_CPU_US = 150.0  # at most: the gateway's CPU per proxied request, cache bypassed
STRETCH_GATEWAY_CPU_US = 100.0
TARGET_GATEWAY_VS_NGINX_CPU = 4.5  # at most: gateway CPU per request over nginx's, same run
STRETCH_GATEWAY_VS_NGINX_CPU = 3.0
#: Order of the client-keys runs (ABBA): the same gateway settings but for a keys file, one key whose rate limit is
#: set far above what wrk sends, so every request pays the key check and a token-bucket take but none is refused.
KEYS_ORDER = ("gateway", "keys", "keys", "gateway")
TARGET_KEYS_ADDED_CPU_US = 10.0  # at most: client keys and rate limits, CPU µs per request added
BENCH_KEY = "bg_bench-client-key-0123456789abcdefghijkl"
#: Order of the payload-logging runs (ABBA): the same gateway but for the model's ``payload_log_percent`` at
#: :data:`PAYLOAD_PERCENT` and a file sink, so every tenth request is queued, encoded and written (gateway CPU).
PAYLOAD_ORDER = ("gateway", "payload", "payload", "gateway")
PAYLOAD_PERCENT = 10
TARGET_PAYLOAD_ADDED_CPU_US = 10.0  # at most: logging a tenth of the requests, CPU µs per request added

GATEWAY_SHARED_CORES_NOTE = (
    "wrk, the gateway and the model server share the machine's cores. Direct, the model server has them to "
    "itself beside wrk; through the gateway, the gateway takes its share (column \"Gateway CPU\") from the "
    "same cores, so gateway / direct measures the gateway's CPU cost per request as much as its latency. "
    "The gateway is idle during the direct runs.")


def check_answers(urls: Mapping[str, str], body: str) -> dict[str, str]:
    """Two requests each way before measuring: all must answer 200, the gateway's from blue with server-timing,
    and its second answer (the same body again) must not come from a cache."""
    headers = {"content-type": "application/json", **steps.GATEWAY_REQUEST_HEADERS}
    with httpx.Client(timeout=10.0) as client:
        answers = [(target, client.post(url, content=body, headers=headers))
                   for _ in range(2) for target, url in urls.items()]
    for target, resp in answers:
        if resp.status_code != 200:
            raise base.SuiteError(f"{target} ({urls[target]}) answered {resp.status_code}: {resp.text[:500]}")
    gw = [resp.headers for target, resp in answers if target == "gateway"][-1]
    if gw.get("x-bluegreen-color") != "blue" or "server-timing" not in gw:
        raise base.SuiteError(f"the gateway's answer lacks the expected headers (color blue, server-timing): "
                              f"{dict(gw)}")
    if gw.get("x-bluegreen-cache") in ("hit", "stale"):
        raise base.SuiteError(f"the gateway answered a repeated request from its cache despite "
                              f"{steps.GATEWAY_REQUEST_HEADERS}")
    return {k: v for k, v in gw.items() if k.startswith("x-bluegreen-") or k == "server-timing"}


def keys_runs(ctx: base.SuiteContext, routing: Mapping[str, Any], server: servers.ServerProcess,
              gateway: servers.ServerProcess, url: str, body: str, duration_s: int) -> list[dict[str, Any]]:
    """The same gateway with and without client keys (``BLUEGREEN_CLIENT_KEYS_FILE``, one key with a rate limit far
    above wrk's rate), in the order of :data:`KEYS_ORDER`: what the key check and the rate limit cost per request."""
    import hashlib

    keys = ctx.work_dir / "bench-keys.yaml"
    keys.write_text(f"bench:\n  key_sha256: {hashlib.sha256(BENCH_KEY.encode()).hexdigest()}\n"
                    "  models: [\"*\"]\n  rate_per_s: 1000000\n  burst: 1000000\n")
    script = ctx.work_dir / "gateway-keys.lua"
    script.write_text(wrk.wrk_lua_script(body, {**steps.GATEWAY_REQUEST_HEADERS,
                                                "Authorization": f"Bearer {BENCH_KEY}"}))
    with servers.gateway_server(routing, ctx.work_dir, {"BLUEGREEN_CLIENT_KEYS_FILE": str(keys)},
                                name="gateway-keys") as keyed:
        return variant_runs(KEYS_ORDER, server, gateway, keyed, url, ctx.work_dir / "gateway.lua", script,
                            duration_s)


def payload_runs(ctx: base.SuiteContext, routing: Mapping[str, Any], server: servers.ServerProcess,
                 gateway: servers.ServerProcess, url: str, duration_s: int) -> list[dict[str, Any]]:
    """The same gateway with and without payload logging (:data:`PAYLOAD_PERCENT` of the requests to rotating
    JSON-lines files under the work folder), in the order of :data:`PAYLOAD_ORDER`: what sampling, the queue and
    the writer (encoding and file writes, on the gateway's own threads) cost per request."""
    import copy

    logged = copy.deepcopy(dict(routing))
    for route in logged["models"].values():
        route["payload_log_percent"] = PAYLOAD_PERCENT
    script = ctx.work_dir / "gateway.lua"
    settings = {"BLUEGREEN_PAYLOAD_LOG__DIR": str(ctx.work_dir / "payloads")}
    with servers.gateway_server(logged, ctx.work_dir, settings, name="gateway-payload") as payload:
        return variant_runs(PAYLOAD_ORDER, server, gateway, payload, url, script, script, duration_s)


def payload_ratios(runs: list[dict[str, Any]]) -> list[base.Ratio]:
    medians = cpu_medians(runs, "payload")
    if medians is None:
        return []
    rps = {t: statistics.median(r["requests_per_s"] for r in runs if r["target"] == t) for t in ("gateway", "payload")}
    return [base.Ratio(f"requests/s with payload logging at {PAYLOAD_PERCENT}% / without (same run, ABBA)",
                       rps["payload"] / rps["gateway"] if rps["gateway"] else 0.0, None),
            base.Ratio(f"CPU µs per request added by payload logging at {PAYLOAD_PERCENT}% (same run, on − off)",
                       medians[1] - medians[0], TARGET_PAYLOAD_ADDED_CPU_US, at_most=True, unit=" µs")]


def keys_ratios(runs: list[dict[str, Any]]) -> list[base.Ratio]:
    medians = cpu_medians(runs, "keys")
    if medians is None:
        return []
    plain, keyed = medians
    return [base.Ratio("gateway CPU µs per request with client keys and a rate limit (median of 2 ABBA runs)",
                       keyed, None, unit=" µs"),
            base.Ratio("CPU µs per request added by client keys and rate limits (same run, keys − none)",
                       keyed - plain, TARGET_KEYS_ADDED_CPU_US, at_most=True, unit=" µs")]


def run(ctx: base.SuiteContext) -> base.SuiteResult:
    """Gateway vs direct to the model server vs nginx: throughput and CPU per request at saturation, added latency
    at half load.

    One model server (``digits`` 1 and 2, default batching), one gateway in front of it (blue = version 1 at
    weight 100; green = version 2 on the same server at weight 0, never called) and, when Debian's nginx is
    installed, nginx with one worker proxying to the same server with keep-alive (the reference for what a proxy
    hop costs) run for the whole suite. wrk measures each in the order of :data:`GATEWAY_ROUNDS` — alternating,
    so that drift in what else the shared machine runs shows up as spread between rounds rather than as a bias to
    one side — and the ratios quoted are medians of the rounds' ratios. The proxies' CPU per request (process CPU
    time over answered requests; nginx's worker) is the figure that says what the hop costs. Then
    :mod:`loadtests.fixed_rate` sends :data:`HALF_LOAD_FRACTION` of the gateway's median saturated rate to direct
    and the gateway, in the order of :data:`HALF_LOAD_ORDER`, and the added latency is median(gateway) −
    median(direct) at each percentile.
    """
    name, version = steps.GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{steps.GATEWAY_GREEN_VERSION}"]
    base.ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    row = [float(x) for x in np.random.default_rng(0).integers(0, 17, 64)]  # pixel intensities 0-16
    body = wrk.v2_json_body("input", row)
    script = ctx.work_dir / "gateway.lua"
    script.write_text(wrk.wrk_lua_script(body, steps.GATEWAY_REQUEST_HEADERS))
    body_file = ctx.work_dir / "gateway-body.json"
    body_file.write_text(body)
    with_nginx = servers.nginx_binary() is not None
    orders = [tuple(t for t in order if with_nginx or t != "nginx") for order in GATEWAY_ROUNDS]

    with servers.model_server(ctx.repo, models, [], ctx.work_dir) as server, contextlib.ExitStack() as stack:
        routing = steps.digits_routing((version, server.url), (steps.GATEWAY_GREEN_VERSION, server.url))
        gateway = stack.enter_context(servers.gateway_server(routing, ctx.work_dir))
        direct_url = f"{server.url}/v2/models/{name}/versions/{version}/infer"
        urls = {"direct": direct_url, "gateway": f"{gateway.url}/v2/models/{name}/infer"}
        proxies: dict[str, servers.ServerProcess] = {"gateway": gateway}
        if with_nginx:
            nginx = stack.enter_context(servers.nginx_proxy(server.url, ctx.work_dir))
            urls["nginx"] = f"{nginx.url}/v2/models/{name}/versions/{version}/infer"
            proxies["nginx"] = nginx
        provenance = check_answers(urls, body)
        print(f"  model server {server.url}, gateway {gateway.url}"
              + (f", nginx {urls['nginx'].split('/v2')[0]}" if with_nginx else " (nginx not installed)")
              + f"; {len(orders)} rounds of wrk at {steps.GATEWAY_CONNECTIONS} connections ({base.WARMUP_S}s warm-up + "
              f"{duration_s}s each)", flush=True)
        runs = []
        for n, order in enumerate(orders, start=1):
            for target in order:
                processes = {"model_server": server, **({"proxy": proxies[target]} if target in proxies else {})}
                if target == "gateway":
                    processes["gateway"] = gateway
                run = steps.saturate(n, target, urls[target], script, duration_s, processes)
                run["proxy_cpu_us_per_request"] = steps.proxy_cpu_us_per_request(run)
                runs.append(run)
        rounds = steps.round_ratios(runs)
        keyed_runs = keys_runs(ctx, routing, server, gateway, urls["gateway"], body, duration_s)
        logged_runs = payload_runs(ctx, routing, server, gateway, urls["gateway"], duration_s)
        notified = notify_runs(ctx, routing, server, gateway, urls["gateway"], duration_s)
        gateway_rps = statistics.median(r["gateway_rps"] for r in rounds)
        if gateway_rps <= 0:
            raise base.SuiteError("the gateway answered no request at saturation")
        rate = min(steps.HALF_LOAD_FRACTION * gateway_rps, steps.HALF_LOAD_MAX_RPS)
        half_processes = {"gateway": gateway, "model_server": server}
        half = [steps.run_fixed_rate(n, target, urls[target], body_file, rate, duration_s, half_processes, ctx.work_dir)
                for n, target in enumerate(HALF_LOAD_ORDER, start=1)]
        log_notes = steps.error_notes([gateway])
        server_cmd = steps.server_command(server)

    median_ratio = statistics.median(r["ratio"] for r in rounds)
    gateway_cpu = steps.median_present([r.get("gateway_cpu_us") for r in rounds])
    ratios = []
    if gateway_cpu is not None:
        ratios.append(base.Ratio(f"gateway CPU µs per request, cache bypassed (median of {len(rounds)} rounds)",
                             gateway_cpu, TARGET_GATEWAY_CPU_US, STRETCH_GATEWAY_CPU_US, at_most=True, unit=" µs"))
    nginx_ratio = steps.median_present([r.get("cpu_vs_nginx") for r in rounds])
    if nginx_ratio is not None:
        ratios.append(base.Ratio(f"gateway CPU per request / nginx CPU per request (median of {len(rounds)} rounds)",
                             nginx_ratio, TARGET_GATEWAY_VS_NGINX_CPU, STRETCH_GATEWAY_VS_NGINX_CPU, at_most=True))
        nginx_cpu = steps.median_present([r.get("nginx_cpu_us") for r in rounds])
        if nginx_cpu is not None:
            ratios.append(base.Ratio(f"nginx CPU µs per request, one worker (median of {len(rounds)} rounds)",
                                 nginx_cpu, None, unit=" µs"))
    ratios.append(base.Ratio(f"gateway / direct requests/s (median of {len(rounds)} rounds)", median_ratio,
                         TARGET_GATEWAY_VS_DIRECT, STRETCH_GATEWAY_VS_DIRECT))
    ratios += keys_ratios(keyed_runs)
    ratios += payload_ratios(logged_runs)
    ratios += notify_ratios(notified)
    medians = steps.median_latency_ms(half)
    timing = steps.server_timing_medians([r for r in half if r["target"] == "gateway"])
    notes = [GATEWAY_SHARED_CORES_NOTE, steps.FIXED_RATE_NOTE,
             *steps.spread_note([r["ratio"] for r in rounds], "ratios")]
    if not with_nginx:
        notes.append("nginx is not installed (Debian's `nginx`), so this run has no reference proxy row.")
    if any(r["bypassed_model_server"] for r in [*runs, *half]):
        notes.append("in a run marked ⚠ the model server inferred fewer rows than the gateway answered: something "
                     "(a cache not bypassed) answered without it, so that run does not measure the proxy path.")
    for doc in half:
        lag = doc["send_lag_ms"].get("p99")
        if lag is not None and lag > GENERATOR_LAG_WARN_MS:
            notes.append(f"in fixed-rate run {doc['run']} ({doc['target']}) the generator started 1% of its requests "
                         f"{lag:.1f} ms or more late (p99 send lag): the cores were crowded, and part of that run's "
                         "tail is the generator's own delay, which it still counts.")
    notes += log_notes
    return base.SuiteResult(
        suite="gateway",
        title="Gateway vs direct to the model server",
        command=base.reproduce("gateway", ctx),
        settings={
            **steps.wrk_settings(server_cmd, routing, duration_s, orders),
            "nginx": {"workers": 1, "upstream_keepalive": servers.NGINX_KEEPALIVE} if with_nginx else None,
            "half_load_fraction": steps.HALF_LOAD_FRACTION, "half_load_max_rps": steps.HALF_LOAD_MAX_RPS,
            "half_load_order": list(HALF_LOAD_ORDER),
            "fixed_rate_connections": steps.FIXED_RATE_CONNECTIONS,
            "fixed_rate_timeout_s": steps.FIXED_RATE_TIMEOUT_S,
        },
        sections={
            "gateway_response_headers": provenance,
            "saturation": runs,
            "rounds": rounds,
            "half_load": {"rate_per_s": rate, "basis_rps": gateway_rps, "runs": half, "median_ms": medians,
                          "added_ms": steps.added_latency_ms(medians)},
            "server_timing_ms": timing,
            "client_keys": keyed_runs,
            "payload_logging": logged_runs,
            "notifications": notified,
        },
        ratios=ratios,
        ok=not (any(r["flagged"] for r in [*runs, *keyed_runs, *logged_runs, *notified["runs"]])
                or any(d["flagged"] for d in half)),
        notes=notes,
    )


def render(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    half = doc["half_load"]
    headers = ", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none"
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One model server (`{s['server_command']}`, default batching) and one "
        f"gateway in front of it routing `{s['model']}` as blue at weight 100 (green at 0, never called); "
        f"{s['rows_per_request']} row per request, extra request header {headers}. Saturation: wrk "
        f"{s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per run, direct, through the gateway"
        + (f" and through nginx (one worker, keep-alive upstream of {s['nginx']['upstream_keepalive']} "
           "connections: the reference for a proxy hop)" if s.get("nginx") else "")
        + f" alternated over {len(s['round_orders'])} rounds ({'; '.join(', '.join(o) for o in s['round_orders'])}). "
        "A proxy's CPU per request is its CPU time over the requests answered in the measured run (nginx: its "
        "worker's). Half load: "
        f"{s['half_load_fraction']:.0%} of the gateway's median saturated rate"
        + (f" (at most {s['half_load_max_rps']:,.0f} requests/s, what the Python open-loop generator sends without "
           "overcommitting the cores)" if s.get("half_load_max_rps") else "") + ", sent at a fixed rate "
        f"({s['warmup_s']} s warm-up then {s['duration_s']} s measured per run) in the order "
        f"{', '.join(s['half_load_order'])}.",
        "",
        "\"CPU pressure\" is the share of the run during which some task waited for a core (Linux PSI), the "
        "benchmark's own processes included: the higher, the more crowded the cores and the noisier the row.",
        "",
        "### Throughput at saturation",
        "",
        "| Round | Target | requests/s | p50 ms | p99 ms | Requests | Rows the model server inferred | Non-2xx "
        "| Socket errors | wrk CPU | Proxy CPU | Proxy CPU µs/request | Model server CPU | CPU pressure |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["saturation"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        lines.append(
            f"| {run['round']} | {run['target']}{flag} | {fmt_int(run['requests_per_s'])} | "
            f"{fmt_ms(lat.get('p50'))} | {fmt_ms(lat.get('p99'))} | {run['requests']:,} | "
            f"{fmt_int(run.get('model_server_rows'))} | {run['non_2xx']:,} | {run['socket_errors']:,} | "
            f"{fmt_cores(run.get('wrk_cores'))} | {fmt_cores(cores.get('proxy', cores.get('gateway')))} | "
            f"{fmt_int(run.get('proxy_cpu_us_per_request'))} | "
            f"{fmt_cores(cores.get('model_server'))} | {fmt_share(run.get('cpu_pressure'))} |")
    lines += ["", "| Round | Direct requests/s | Gateway requests/s | nginx requests/s | Gateway / direct "
              "| Gateway CPU µs/request | nginx CPU µs/request | Gateway / nginx CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {fmt_int(r['direct_rps'])} | {fmt_int(r['gateway_rps'])} | "
              f"{fmt_int(r.get('nginx_rps'))} | {r['ratio']:.2f}x | {fmt_int(r.get('gateway_cpu_us'))} | "
              f"{fmt_int(r.get('nginx_cpu_us'))} | "
              f"{'-' if r.get('cpu_vs_nginx') is None else format(r['cpu_vs_nginx'], '.2f') + 'x'} |"
              for r in doc["rounds"]]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [base.ratio_row(r) for r in doc["ratios"]]
    lines += variant_table(doc.get("client_keys") or [],
                           "Client keys: the same gateway settings with and without `BLUEGREEN_CLIENT_KEYS_FILE` (one "
                           "key, its rate limit far above wrk's rate: every request pays the key check and a "
                           f"token-bucket take, none is refused), in the order {', '.join(KEYS_ORDER)}.")
    lines += variant_table(doc.get("payload_logging") or [],
                           f"Payload logging: the same gateway settings with and without `payload_log_percent: "
                           f"{PAYLOAD_PERCENT}` and a file sink (`BLUEGREEN_PAYLOAD_LOG__DIR`), in the order "
                           f"{', '.join(PAYLOAD_ORDER)}.")
    lines += render_notify(doc.get("notifications"))
    lines += [
        "",
        f"### Added latency at half load ({fmt_int(half['rate_per_s'])} requests/s)",
        "",
        "Latency in ms from each request's due time (nearest-rank percentiles of the measured window). "
        "\"Gateway-timed\" is the gateway's own `server-timing` account of its time outside the upstream call.",
        "",
        "| Run | Target | Answered/s | p50 | p90 | p99 | p99.9 | max | Send lag p99 | Gateway-timed p50 / p99 "
        "| Non-2xx | No answer | Generator CPU | Gateway CPU | Model server CPU | CPU pressure |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in half["runs"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        own = run.get("server_timing_ms", {}).get("gateway")
        own_text = f"{fmt_ms2(own.get('p50'))} / {fmt_ms2(own.get('p99'))}" if own else "-"
        lines.append(
            f"| {run['run']} | {run['target']}{flag} | {fmt_int(run['answered_per_s'])} | "
            f"{fmt_ms2(lat.get('p50'))} | {fmt_ms2(lat.get('p90'))} | {fmt_ms2(lat.get('p99'))} | "
            f"{fmt_ms2(lat.get('p99.9'))} | {fmt_ms2(lat.get('max'))} | {fmt_ms2(run['send_lag_ms'].get('p99'))} | "
            f"{own_text} | {run['non_2xx']:,} | {sum(run['errors'].values()) + run.get('unfinished', 0):,} | "
            f"{fmt_cores(cores.get('generator'))} | {fmt_cores(cores.get('gateway'))} | "
            f"{fmt_cores(cores.get('model_server'))} | {fmt_share(run.get('cpu_pressure'))} |")
    medians, added = half["median_ms"], half["added_ms"]
    lines += ["", "| Latency, ms | p50 | p90 | p99 |", "|---|---:|---:|---:|"]
    for target, m in medians.items():
        runs = sum(1 for r in half["runs"] if r["target"] == target)
        lines.append(f"| {target} (median of {runs} runs) | {fmt_ms2(m.get('p50'))} | {fmt_ms2(m.get('p90'))} | "
                     f"{fmt_ms2(m.get('p99'))} |")
    lines.append(f"| **added by the gateway** | **{fmt_added(added.get('p50'))}** | {fmt_added(added.get('p90'))} | "
                 f"**{fmt_added(added.get('p99'))}** |")
    timing = doc.get("server_timing_ms") or {}
    gw, up = timing.get("gateway"), timing.get("upstream")
    if gw:
        upstream = (f"; the upstream call p50 {fmt_ms2(up.get('p50'))} ms, p99 {fmt_ms2(up.get('p99'))} ms"
                    if up else "")
        lines += ["", f"The gateway's own account, from its `server-timing` header on {fmt_int(gw.get('count'))} "
                      f"answers of the half-load runs through it (median over runs): time in the gateway outside the "
                      f"upstream call p50 {fmt_ms2(gw.get('p50'))} ms, p99 {fmt_ms2(gw.get('p99'))} ms{upstream}. "
                      "Its clock starts once the request body has been read and stops before the answer is written, "
                      "so HTTP parsing, the middleware and the event loop's queueing are outside it: the added "
                      "latency above is the figure a client sees."]
    return lines + base.closing_lines(doc, "a run answered non-2xx or lost requests (⚠ above); its figures are not "
                                      "comparable.")



SUITE = base.Suite("gateway", run, render)
