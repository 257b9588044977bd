"""The ``telemetry`` suite: the gateway's throughput with telemetry on vs off, the cache bypassed."""

from __future__ import annotations

import statistics
from typing import Any

import httpx
import numpy as np

from loadtests.bench import base, servers, steps, wrk
from loadtests.bench.base import fmt_int
from serving.machine import machine_line

TELEMETRY_ROUNDS = (("on", "off"), ("off", "on"), ("on", "off"), ("off", "on"))
TARGET_TELEMETRY_ON_VS_OFF = 0.95
TELEMETRY_NOTE = (
    "Two gateways run side by side in front of one model server, identical but for `BLUEGREEN_TELEMETRY=false`; "
    "wrk drives one at a time (the other idles), with the cache bypassed so every request takes the proxy path. "
    "\"On\" is the default deployment: Prometheus series recorded on every request; no OTLP endpoint and no "
    "tracing configured (`OTEL_*` unset), as on this machine by default.")


def run(ctx: base.SuiteContext) -> base.SuiteResult:
    """Gateway throughput with telemetry on vs off (``BLUEGREEN_TELEMETRY=false``), the cache bypassed.

    One model server and two gateways in front of it, identical but for telemetry, run for the whole suite; wrk
    drives one at a time in the order of :data:`TELEMETRY_ROUNDS`, and the ratio quoted is the median of the
    rounds' on / off. Afterwards each gateway's ``/metrics`` must show that it recorded (on) or did not (off).
    """
    name, version = steps.GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{steps.GATEWAY_GREEN_VERSION}"]
    base.ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    row = [float(x) for x in np.random.default_rng(0).integers(0, 17, 64)]
    body = wrk.v2_json_body("input", row)
    script = ctx.work_dir / "telemetry.lua"
    script.write_text(wrk.wrk_lua_script(body, steps.GATEWAY_REQUEST_HEADERS))
    settings = {"on": {}, "off": {"BLUEGREEN_TELEMETRY": "false"}}

    with servers.model_server(ctx.repo, models, [], ctx.work_dir) as server:
        routing = steps.digits_routing((version, server.url), (steps.GATEWAY_GREEN_VERSION, server.url))
        with servers.gateway_server(routing, ctx.work_dir, settings["on"], name="gateway-telemetry-on") as gw_on, \
                servers.gateway_server(routing, ctx.work_dir, settings["off"], name="gateway-telemetry-off") as gw_off:
            gateways = {"on": gw_on, "off": gw_off}
            urls = {t: f"{gw.url}/v2/models/{name}/infer" for t, gw in gateways.items()}
            with httpx.Client(timeout=10.0) as client:
                for url in urls.values():
                    for _ in range(2):
                        steps.post_checked(client, url, body, steps.GATEWAY_REQUEST_HEADERS, cache="bypass")
            print(f"  model server {server.url}, gateways {gw_on.url} (telemetry on) and {gw_off.url} (off); "
                  f"{len(TELEMETRY_ROUNDS)} rounds of wrk at {steps.GATEWAY_CONNECTIONS} connections "
                  f"({base.WARMUP_S}s warm-up + {duration_s}s each)", flush=True)
            runs = [steps.saturate(n, target, urls[target], script, duration_s,
                              {"gateway": gateways[target], "model_server": server})
                    for n, order in enumerate(TELEMETRY_ROUNDS, start=1) for target in order]
            recorded = {t: servers.prometheus_value(servers.admin_get(gw, "/metrics").text,
                                                    "bluegreen_request_duration_seconds_count", {"model": name})
                        for t, gw in gateways.items()}
            notes = [TELEMETRY_NOTE, *steps.error_notes([gw_on, gw_off])]
        server_cmd = steps.server_command(server)

    table = steps.round_table(runs, "off")
    median_ratio = steps.median_round_ratio(table, "on")
    ratios = [base.Ratio(f"telemetry on / off requests/s (median of {len(table)} rounds)", median_ratio,
                     TARGET_TELEMETRY_ON_VS_OFF)]
    cpu_ratios = []
    for r in table:
        per_request = {run["target"]: steps.gateway_cpu_us_per_request(run)
                       for run in runs if run["round"] == r["round"]}
        on, off = per_request.get("on"), per_request.get("off")
        if on is not None and off:
            r["gateway_cpu_us_per_request"] = per_request
            cpu_ratios.append(on / off)
    if cpu_ratios:
        ratios.append(base.Ratio(f"gateway CPU per request, on / off (median of {len(cpu_ratios)} rounds)",
                             statistics.median(cpu_ratios), None))
    notes += steps.spread_note([r["ratios"]["on"] for r in table if "on" in r["ratios"]], "on / off")
    telemetry_ok = bool(recorded["on"]) and not recorded["off"]
    if not telemetry_ok:
        notes.append(f"the gateways' /metrics do not show telemetry on and off as configured (requests recorded in "
                     f"bluegreen_request_duration_seconds: on {recorded['on']}, off {recorded['off']}): the ratio "
                     "does not measure telemetry's cost.")
    return base.SuiteResult(
        suite="telemetry",
        title="Telemetry on vs off",
        command=base.reproduce("telemetry", ctx),
        settings={
            **steps.wrk_settings(server_cmd, routing, duration_s, TELEMETRY_ROUNDS), "gateway_settings": settings,
            "labels": {"on": "telemetry on", "off": "telemetry off"},
        },
        sections={"requests_recorded_in_metrics": recorded, "saturation": runs, "round_table": table},
        ratios=ratios,
        ok=telemetry_ok and not any(r["flagged"] for r in runs),
        notes=notes,
    )


def render(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", {"on": "telemetry on", "off": "telemetry off"})
    recorded = doc.get("requests_recorded_in_metrics", {})
    headers = ", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none"
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One model server (`{s['server_command']}`) and two gateways in front of it "
        f"routing `{s['model']}` as blue at weight 100, one with telemetry (the default), one with "
        "`BLUEGREEN_TELEMETRY=false`; extra request header " + headers + f". wrk {s['wrk_threads']} threads x "
        f"{s['connections']} connections, {s['warmup_s']} s warm-up then {s['duration_s']} s measured per run, "
        f"alternated over {len(s['round_orders'])} rounds "
        f"({'; '.join(', '.join(o) for o in s['round_orders'])}). Requests counted by each gateway's "
        f"`bluegreen_request_duration_seconds` afterwards: on {fmt_int(recorded.get('on'))}, "
        f"off {fmt_int(recorded.get('off'))} (none is right for off).",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += steps.saturation_table(doc["saturation"], labels)
    lines += ["", *steps.round_table_lines(doc["round_table"], "off", labels)]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [base.ratio_row(r) for r in doc["ratios"]]
    return lines + base.closing_lines(doc)



SUITE = base.Suite("telemetry", run, render)
