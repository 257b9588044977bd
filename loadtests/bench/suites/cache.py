"""The ``cache`` suite: the prediction cache's L1 hit, L2 hit and miss through the gateway vs direct to the model
server."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from loadtests.bench import base, servers, steps, wrk
from loadtests.bench.base import fmt_cores
from serving.machine import machine_line

TARGET_MISS_CPU_US = 170.0  # at most: a real miss (unique inputs, cache on, no Redis)
STRETCH_MISS_CPU_US = 110.0
TARGET_L1_HIT_CPU_US = 80.0
STRETCH_L1_HIT_CPU_US = 50.0
CACHE_ROUNDS = (("direct", "l1_hit", "l2_hit", "miss"), ("miss", "l2_hit", "l1_hit", "direct"))
CACHE_L2_BODIES = 128  # distinct bodies the L2-hit run cycles through, each stored in Redis beforehand
CACHE_L2_L1_ENTRIES = 1  # the L2-hit gateway's L1: one entry, so a lookup of the next body in the cycle goes to Redis
#: Long enough that no entry expires during a long run (expired entries are misses): the TTL is not what is measured.
CACHE_TTL_S = 3600
#: Per cache target: the counter of ``GET /admin/v1/cache`` its lookups must land in, and the least share of all
#: lookups during the measured run that it must hold for the run to count. The L2 run's one-entry L1 still
#: answers when two threads happen to send the same body back to back.
CACHE_EXPECTED_PATH = {"l1_hit": ("l1_hits", 0.99), "l2_hit": ("l2_hits", 0.9), "miss": ("misses", 0.99)}
CACHE_LABELS = {"direct": "direct", "l1_hit": "L1 hit", "l2_hit": "L2 hit", "miss": "miss"}
TARGET_L1_HIT_VS_DIRECT = 1.5
STRETCH_L1_HIT_VS_DIRECT = 2.0

CACHE_NOTE = (
    "Every run shares the machine's cores with wrk, the model server, the gateways and Redis. A hit is answered "
    "by the gateway alone (the model server stays idle: see its rows), so hit / direct compares the gateway's "
    "cache path with the model server's whole request path on the same cores. The L2-hit gateway keeps one "
    "entry in L1 and cycles through distinct bodies stored in Redis beforehand; each L2 hit is also written into "
    "that one-entry L1, as any L2 hit is. A miss carries a body never sent before (its first pixels number it), so "
    "it pays the lookup, the upstream call and the store.")

# telemetry suite
#: Alternating, so drift favours neither side; the ratio quoted is the median of the rounds' on / off.
def cache_path_shares(counters: Mapping[str, int]) -> dict[str, float]:
    """Each lookup path's share of the lookups counted (:data:`CACHE_PATHS`); all 0 when there were none."""
    lookups = sum(counters.get(k, 0) for k in servers.CACHE_PATHS)
    return {k: (counters.get(k, 0) / lookups if lookups else 0.0) for k in servers.CACHE_PATHS}


def cache_path_ok(target: str, counters: Mapping[str, int]) -> bool:
    """Whether a cache run's lookups went the way its target says (:data:`CACHE_EXPECTED_PATH`)."""
    expected = CACHE_EXPECTED_PATH.get(target)
    if expected is None:
        return True
    path, least = expected
    return sum(counters.get(k, 0) for k in servers.CACHE_PATHS) > 0 and cache_path_shares(counters)[path] >= least


def _prewarm_l2(gateway: servers.ServerProcess, redis: servers.ServerProcess, url: str,
                bodies: Sequence[str]) -> dict[str, Any]:
    """Send each body once through the L2 gateway (misses, written to Redis in the background), wait until Redis
    holds them all, and prove that one comes back as an L2 hit."""
    import redis as redis_client

    with httpx.Client(timeout=10.0) as client:
        for body in bodies:
            steps.post_checked(client, url, body, cache="miss")
        r = redis_client.Redis.from_url(redis.url)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                keys = sum(1 for _ in r.scan_iter(match="bluegreen:cache:*", count=1000))
                if keys >= len(bodies):
                    break
                if time.monotonic() > deadline:
                    raise base.SuiteError(f"Redis holds {keys} cache entries after {len(bodies)} distinct bodies "
                                          "were sent")
                time.sleep(0.1)
        finally:
            r.close()
        before = servers.cache_counters(gateway)
        steps.post_checked(client, url, bodies[0], cache="hit")  # long gone from the one-entry L1
        after = servers.cache_counters(gateway)
    if after.get("l2_hits", 0) - before.get("l2_hits", 0) != 1:
        raise base.SuiteError(f"a body stored in Redis was not answered as an L2 hit: {before} -> {after}")
    return {"bodies": len(bodies), "redis_cache_keys": keys}


def _cache_and_redis_counters(gateway: servers.ServerProcess, redis: servers.ServerProcess) -> dict[str, int]:
    return {**servers.cache_counters(gateway), **servers.redis_commands(redis)}


def redis_calls_per_request(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Over the runs that counted Redis commands: calls of each command per request answered, largest first."""
    counted = [r for r in runs if any(k.startswith("redis_") for k in r.get("counters", {}))]
    requests = sum(int(r["requests"]) for r in counted)
    totals: dict[str, int] = {}
    for r in counted:
        for k, v in r["counters"].items():
            if k.startswith("redis_") and v:
                totals[k.removeprefix("redis_")] = totals.get(k.removeprefix("redis_"), 0) + int(v)
    if not requests:
        return {}
    return {k: v / requests for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def run(ctx: base.SuiteContext) -> base.SuiteResult:
    """The prediction cache: L1 hit, L2 hit and miss through the gateway vs direct to the model server.

    One model server (``digits`` 1 and 2), a private ``redis-server`` and two gateways run for the whole suite:
    one with the embedded L1 only (the L1-hit and miss runs), one with a one-entry L1 in front of Redis (the L2-hit
    run). wrk, :data:`GATEWAY_CONNECTIONS` connections, in the order of :data:`CACHE_ROUNDS`. The L1-hit run sends
    one body again and again; the L2-hit run cycles through :data:`CACHE_L2_BODIES` distinct bodies stored in
    Redis beforehand; the miss run sends a body never seen before with every request. Around every gateway run the
    cache counters of ``GET /admin/v1/cache`` say which way its lookups went, and a run that did not take its
    path (:data:`CACHE_EXPECTED_PATH`) is flagged.
    """
    name, version = steps.GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{steps.GATEWAY_GREEN_VERSION}"]
    base.ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    rng = np.random.default_rng(0)
    row = [float(x) for x in rng.integers(0, 17, 64)]  # pixel intensities 0-16
    body = wrk.v2_json_body("input", row)
    l2_bodies = [wrk.v2_json_body("input", [float(x) for x in r])
                 for r in np.unique(rng.integers(0, 17, (CACHE_L2_BODIES, 64)), axis=0)]
    scripts = {"direct": wrk.wrk_lua_script(body), "l1_hit": wrk.wrk_lua_script(body),
               "l2_hit": wrk.wrk_lua_cycle_script(l2_bodies), "miss": wrk.wrk_lua_unique_script("input", row)}
    paths = {}
    for target, text in scripts.items():
        paths[target] = ctx.work_dir / f"cache-{target}.lua"
        paths[target].write_text(text)
    common = {"BLUEGREEN_CACHE__TTL_S": str(CACHE_TTL_S)}

    with servers.model_server(ctx.repo, models, [], ctx.work_dir) as server, \
            servers.redis_server(ctx.work_dir) as redis:
        routing = steps.digits_routing((version, server.url), (steps.GATEWAY_GREEN_VERSION, server.url))
        l2_settings = {**common, "BLUEGREEN_REDIS_URL": redis.url,
                       "BLUEGREEN_CACHE__L1_MAX_ENTRIES": str(CACHE_L2_L1_ENTRIES)}
        with servers.gateway_server(routing, ctx.work_dir, common, name="gateway-l1") as gw_l1, \
                servers.gateway_server(routing, ctx.work_dir, l2_settings, name="gateway-l2") as gw_l2:
            gateway_url = f"/v2/models/{name}/infer"
            urls = {"direct": f"{server.url}/v2/models/{name}/versions/{version}/infer",
                    "l1_hit": gw_l1.url + gateway_url, "l2_hit": gw_l2.url + gateway_url,
                    "miss": gw_l1.url + gateway_url}
            gateways = {"l1_hit": gw_l1, "l2_hit": gw_l2, "miss": gw_l1}
            processes: dict[str, dict[str, servers.ServerProcess]] = {
                "direct": {"model_server": server}, "l1_hit": {"gateway": gw_l1, "model_server": server},
                "l2_hit": {"gateway": gw_l2, "redis": redis, "model_server": server},
                "miss": {"gateway": gw_l1, "model_server": server}}
            with httpx.Client(timeout=10.0) as client:
                steps.post_checked(client, urls["direct"], body)
                steps.post_checked(client, urls["l1_hit"], body)
                provenance = dict(steps.post_checked(client, urls["l1_hit"], body, cache="hit").headers)
            if servers.admin_get(gw_l2, "/admin/v1/cache").json().get("l2") != "closed":
                raise base.SuiteError("the L2 gateway's cache has no Redis tier (GET /admin/v1/cache: l2 is not "
                                      "closed)")
            prewarm = _prewarm_l2(gw_l2, redis, urls["l2_hit"], l2_bodies)
            print(f"  model server {server.url}, redis {redis.url}, gateways {gw_l1.url} (L1) and {gw_l2.url} "
                  f"(L1 of {CACHE_L2_L1_ENTRIES} + Redis, {prewarm['redis_cache_keys']} entries stored); "
                  f"{len(CACHE_ROUNDS)} rounds of wrk at {steps.GATEWAY_CONNECTIONS} connections "
                  f"({base.WARMUP_S}s warm-up + {duration_s}s each)", flush=True)
            runs = []
            for n, order in enumerate(CACHE_ROUNDS, start=1):
                for target in order:
                    gw = gateways.get(target)
                    counters = None if gw is None else functools.partial(servers.cache_counters, gw)
                    if target == "l2_hit":  # and what Redis was asked for meanwhile
                        counters = functools.partial(_cache_and_redis_counters, gw_l2, redis)
                    run = steps.saturate(n, target, urls[target], paths[target], duration_s, processes[target],
                                    expect_upstream=target in ("direct", "miss"), counters=counters)
                    if gw is not None:
                        run["gateway"] = gw.name
                        run["path_share"] = cache_path_shares(run["counters"])
                        run["wrong_path"] = not cache_path_ok(target, run["counters"])
                        run["flagged"] = run["flagged"] or run["wrong_path"]
                        if run["wrong_path"]:
                            print(f"  round {n} {target}: FLAGGED, its lookups went {run['counters']}", flush=True)
                    runs.append(run)
            final_stats = {"gateway-l1": servers.admin_get(gw_l1, "/admin/v1/cache").json(),
                           "gateway-l2": servers.admin_get(gw_l2, "/admin/v1/cache").json()}
            notes = [CACHE_NOTE, *steps.error_notes([gw_l1, gw_l2])]
        server_cmd = steps.server_command(server)

    table = steps.round_table(runs, "direct")
    for r in table:
        rps = r["rps"]
        if rps.get("miss"):
            r["ratios"]["L1 hit / miss"] = rps.get("l1_hit", 0.0) / rps["miss"]
    n = len(table)
    cpu = {t: steps.median_present([steps.gateway_cpu_us_per_request(r) for r in runs if r["target"] == t])
           for t in ("l1_hit", "miss")}
    ratios = [
        base.Ratio(f"L1 hit / direct requests/s (median of {n} rounds)", steps.median_round_ratio(table, "l1_hit"),
               TARGET_L1_HIT_VS_DIRECT, STRETCH_L1_HIT_VS_DIRECT),
        base.Ratio(f"L2 hit / direct requests/s (median of {n} rounds)", steps.median_round_ratio(table, "l2_hit"),
                   None),
        base.Ratio(f"miss / direct requests/s (median of {n} rounds)", steps.median_round_ratio(table, "miss"), None),
        base.Ratio(f"L1 hit / miss requests/s (median of {n} rounds)",
                   steps.median_round_ratio(table, "L1 hit / miss"), None),
    ]
    if cpu["l1_hit"] is not None:
        ratios.append(base.Ratio(f"gateway CPU µs per request, L1 hit (median of {n} runs)", cpu["l1_hit"],
                             TARGET_L1_HIT_CPU_US, STRETCH_L1_HIT_CPU_US, at_most=True, unit=" µs"))
    if cpu["miss"] is not None:
        ratios.append(base.Ratio(f"gateway CPU µs per request, real miss: unique inputs, no Redis (median of {n} runs)",
                             cpu["miss"], TARGET_MISS_CPU_US, STRETCH_MISS_CPU_US, at_most=True, unit=" µs"))
    notes += steps.spread_note([r["ratios"]["l1_hit"] for r in table if "l1_hit" in r["ratios"]], "L1 hit / direct")
    if any(r.get("wrong_path") for r in runs):
        notes.append("a run marked ⚠ did not take the path it is named after (see its lookups): its throughput "
                     "does not measure that path.")
    return base.SuiteResult(
        suite="cache",
        title="Prediction cache: L1 hit, L2 hit and miss vs direct to the model server",
        command=base.reproduce("cache", ctx),
        settings={
            **steps.wrk_settings(server_cmd, routing, duration_s, CACHE_ROUNDS, request_headers=False),
            "l2_bodies": len(l2_bodies), "l2_gateway_l1_max_entries": CACHE_L2_L1_ENTRIES,
            "gateway_settings": {"gateway-l1": common, "gateway-l2": {**l2_settings, "BLUEGREEN_REDIS_URL":
                                                                      "redis://127.0.0.1:<free port>/0"}},
            "expected_paths": {t: {"counter": c, "least_share": s} for t, (c, s) in CACHE_EXPECTED_PATH.items()},
            "labels": CACHE_LABELS,
        },
        sections={
            "gateway_response_headers": {k: v for k, v in provenance.items()
                                         if k.startswith("x-bluegreen-") or k == "server-timing"},
            "prewarm": prewarm,
            "redis_calls_per_l2_request": redis_calls_per_request([r for r in runs if r["target"] == "l2_hit"]),
            "saturation": runs,
            "round_table": table,
            "cache_stats_at_end": final_stats,
        },
        ratios=ratios,
        ok=not any(r["flagged"] for r in runs),
        notes=notes,
    )


def _fmt_shares(run: Mapping[str, Any]) -> str:
    share = run.get("path_share")
    if not share:
        return "-"
    return " / ".join(f"{share.get(k, 0.0):.0%}" for k in servers.CACHE_PATHS)


def render(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", CACHE_LABELS)
    l2 = s["gateway_settings"]["gateway-l2"]
    prewarm = doc.get("prewarm", {})
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. Direct: one model server (`{s['server_command']}`, default batching). "
        f"Through the gateway: a private `redis-server` and two gateways routing `{s['model']}` as blue at weight "
        "100: **gateway-l1** (the embedded L1 only) answers the L1-hit and miss runs; **gateway-l2** "
        f"(`BLUEGREEN_REDIS_URL` set, `BLUEGREEN_CACHE__L1_MAX_ENTRIES={l2.get('BLUEGREEN_CACHE__L1_MAX_ENTRIES')}`) "
        "the L2-hit run; both with " + ", ".join(f"`{k}={v}`" for k, v in s["gateway_settings"]["gateway-l1"].items())
        + f". wrk {s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per run, in the order "
        f"{'; '.join(', '.join(labels.get(t, t) for t in o) for o in s['round_orders'])}. L1 hit: one body again "
        f"and again. L2 hit: {s['l2_bodies']} distinct bodies in turn, each sent once beforehand "
        f"({prewarm.get('redis_cache_keys', '?')} keys under `bluegreen:cache:` in Redis, and one checked to come "
        "back as an L2 hit). Miss: every request a body never sent before. No `Cache-Control` header.",
        "",
        "\"Lookups L1 / L2 / miss\" is how the gateway's lookups went during the measured run, from its counters "
        "(`GET /admin/v1/cache`, read before and after): the run is flagged (⚠) when its own path holds less than "
        + ", ".join(f"{v['least_share']:.0%} ({labels.get(t, t)})" for t, v in s["expected_paths"].items())
        + ". \"CPU pressure\" is the share of the run during which some task waited for a core (Linux PSI).",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += steps.saturation_table(doc["saturation"], labels, [
        ("Lookups L1 / L2 / miss", _fmt_shares),
        ("Redis CPU", lambda run: fmt_cores(run.get("cores", {}).get("redis")))])
    redis_calls = doc.get("redis_calls_per_l2_request")
    if redis_calls:
        lines += ["", "Redis commands per request during the L2-hit runs (`INFO commandstats`): "
                  + ", ".join(f"{name.upper()} {calls:.2f}" for name, calls in redis_calls.items() if calls >= 0.01)
                  + "."]
    lines += ["", *steps.round_table_lines(doc["round_table"], "direct", labels)]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [base.ratio_row(r) for r in doc["ratios"]]
    return lines + base.closing_lines(doc)



SUITE = base.Suite("cache", run, render)
