"""The ``shadow`` suite: the clients' latency at half load with and without shadow traffic, and the shadow
copies' agreement beside the same comparison made offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.bench import base, servers, steps, wrk
from loadtests.bench.base import fmt_cores, fmt_int, fmt_ms2, fmt_share
from serving.agreement import compare
from serving.machine import machine_line

SHADOW_PERCENT = 10
SHADOW_BODIES = 64  # held-out digits images, sent in turn: agreement between the two versions is then meaningful
SHADOW_SATURATION_ORDER = ("off", "on")
# ABBA BAAB: four runs each, balanced against drift; the shared machines' noise swung a two-run median by 30%.
SHADOW_HALF_LOAD_ORDER = ("off", "on", "on", "off", "on", "off", "off", "on")
TARGET_SHADOW_P50 = 1.15  # at most: the clients' p50 with shadowing within 15% of the same run without
STRETCH_SHADOW_P50 = 1.05
SHADOW_PERCENTILES = ("p50", "p90", "p95", "p99")
SHADOW_NOTE = (
    "Blue (`digits:1`) and green (`digits:2`) are two model server processes; two gateways route 100% to blue, one "
    f"copying {SHADOW_PERCENT}% of the requests to green (`shadow_percent: {SHADOW_PERCENT}`), one not "
    "(`shadow_percent: 0`). The cache is bypassed (`Cache-Control: no-cache, no-store`): a cache hit sends no "
    "shadow copy. The half-load rate is half of the slower gateway's saturated rate (the shadowed one, as a rule), "
    "so that neither is more than half loaded: near the cores' limit (the Python generator takes about a quarter "
    "of a core per 1,000 requests/s) latency turns on any extra work, and the comparison would measure the knee "
    "rather than shadowing. \"Green rows\" is what the green model server inferred during the run: the shadow "
    "copies.")


def shadow_bodies(repo: Path, count: int) -> list[str]:
    """V2 bodies of the first ``count`` held-out digits images (the blue version's ``holdout.npz``)."""
    name, version = steps.GATEWAY_MODEL
    with np.load(repo / name / version / "holdout.npz") as holdout:
        rows = holdout["input"][:count]
    return [wrk.v2_json_body("input", [float(x) for x in r]) for r in rows]


def offline_agreement(blue_url: str, green_url: str, bodies: Sequence[str]) -> dict[str, Any]:
    """Each body sent once to each color's model server directly, compared by the gateway's own rule."""
    agreed = compared = 0
    with httpx.Client(timeout=10.0) as client:
        for body in bodies:
            a = steps.post_checked(client, blue_url, body).content
            b = steps.post_checked(client, green_url, body).content
            result = compare(a, b, 1e-4)
            if result is not None:
                compared += 1
                agreed += result[0]
    return {"compared": compared, "agreed": agreed, "ratio": agreed / compared if compared else None}


def run(ctx: base.SuiteContext) -> base.SuiteResult:
    """Shadow traffic at :data:`SHADOW_PERCENT`%: the clients' latency at half load with and without it.

    Blue and green are two model server processes (``digits`` 1 and 2); two gateways route everything to blue,
    one with ``shadow_percent`` :data:`SHADOW_PERCENT`, one with 0. wrk measures each at saturation (the rate
    basis, and shadowing's cost in throughput); then :mod:`loadtests.fixed_rate` sends half the slower gateway's
    saturated rate to each in the order of :data:`SHADOW_HALF_LOAD_ORDER`, and the figure is
    median(p50 with) / median(p50 without). The requests cycle through held-out digits images, so the
    gateway's ``bluegreen_shadow_agreement_ratio`` means something; it is set beside the same comparison made
    offline, each image sent to both model servers directly.
    """
    name, version = steps.GATEWAY_MODEL
    base.ensure_models(ctx.repo, [f"{name}:{version}", f"{name}:{steps.GATEWAY_GREEN_VERSION}"])
    duration_s = max(1, round(ctx.duration_s))
    bodies = shadow_bodies(ctx.repo, SHADOW_BODIES)
    script = ctx.work_dir / "shadow.lua"
    script.write_text(wrk.wrk_lua_cycle_script(bodies, steps.GATEWAY_REQUEST_HEADERS))
    body_file = ctx.work_dir / "shadow-bodies.jsonl"
    body_file.write_text("\n".join(bodies) + "\n")
    percents = {"off": 0, "on": SHADOW_PERCENT}

    with servers.model_server(ctx.repo, [f"{name}:{version}"], [], ctx.work_dir) as blue, \
            servers.model_server(ctx.repo, [f"{name}:{steps.GATEWAY_GREEN_VERSION}"], [], ctx.work_dir) as green:
        routings = {t: steps.digits_routing((version, blue.url), (steps.GATEWAY_GREEN_VERSION, green.url), pct)
                    for t, pct in percents.items()}
        with servers.gateway_server(routings["off"], ctx.work_dir, name="gateway-shadow-off") as gw_off, \
                servers.gateway_server(routings["on"], ctx.work_dir, name="gateway-shadow-on") as gw_on:
            gateways = {"off": gw_off, "on": gw_on}
            urls = {t: f"{gw.url}/v2/models/{name}/infer" for t, gw in gateways.items()}
            with httpx.Client(timeout=10.0) as client:
                for url in urls.values():
                    resp = steps.post_checked(client, url, bodies[0], steps.GATEWAY_REQUEST_HEADERS, cache="bypass")
                    if resp.headers.get("x-bluegreen-color") != "blue":
                        raise base.SuiteError(f"{url} answered from {resp.headers.get('x-bluegreen-color')}, not blue")
            processes = {t: {"gateway": gw, "model_server": blue, "green_server": green} for t, gw in gateways.items()}
            print(f"  blue {blue.url}, green {green.url}, gateways {gw_off.url} (no shadow) and {gw_on.url} "
                  f"({SHADOW_PERCENT}% shadow); wrk at {steps.GATEWAY_CONNECTIONS} connections, then fixed rate",
                  flush=True)

            def green_rows() -> int | None:
                stats = servers.model_stats(green.url, name, steps.GATEWAY_GREEN_VERSION)
                return None if stats is None else stats[0]

            saturation = []
            for target in SHADOW_SATURATION_ORDER:
                rows0 = green_rows()
                run = steps.saturate(1, target, urls[target], script, duration_s, processes[target])
                rows1 = green_rows()
                run["green_rows"] = None if rows0 is None or rows1 is None else rows1 - rows0  # warm-up included
                saturation.append(run)
            # Half of the slower gateway's rate (the shadowed one, as a rule): both are then at most half loaded.
            basis = min(r["requests_per_s"] for r in saturation)
            if basis <= 0:
                raise base.SuiteError("the gateway answered no request at saturation")
            rate = min(steps.HALF_LOAD_FRACTION * basis, steps.HALF_LOAD_MAX_RPS)
            half = []
            for n, target in enumerate(SHADOW_HALF_LOAD_ORDER, start=1):
                rows0 = green_rows()
                run = steps.run_fixed_rate(n, target, urls[target], body_file, rate, duration_s, processes[target],
                                     ctx.work_dir)
                rows1 = green_rows()
                run["green_rows"] = None if rows0 is None or rows1 is None else rows1 - rows0  # warm-up included
                half.append(run)
            metrics = servers.admin_get(gw_on, "/metrics").text
            agreement = servers.prometheus_value(metrics, "bluegreen_shadow_agreement_ratio", {"model": name})
            green_infer = f"{green.url}/v2/models/{name}/versions/{steps.GATEWAY_GREEN_VERSION}/infer"
            offline = offline_agreement(f"{blue.url}/v2/models/{name}/versions/{version}/infer", green_infer, bodies)
            notes = [SHADOW_NOTE, steps.FIXED_RATE_NOTE, *steps.error_notes([gw_off, gw_on])]
        blue_command, green_command = steps.server_command(blue), steps.server_command(green)

    medians = steps.median_latency_ms(half, SHADOW_PERCENTILES)
    p50 = {t: medians.get(t, {}).get("p50") for t in percents}
    p99 = {t: medians.get(t, {}).get("p99") for t in percents}
    if not (p50["on"] and p50["off"]):
        raise base.SuiteError("a half-load run answered nothing: no latency to compare")
    each = min(sum(1 for r in half if r["target"] == t) for t in percents)
    ratios = [base.Ratio(f"p50 with / without shadowing at half load (median of {each} runs each)",
                         p50["on"] / p50["off"], TARGET_SHADOW_P50, STRETCH_SHADOW_P50, at_most=True)]
    if p99["on"] and p99["off"]:
        ratios.append(base.Ratio(f"p99 with / without shadowing at half load (median of {each} runs each)",
                             p99["on"] / p99["off"], None, at_most=True))
    sat = {r["target"]: r["requests_per_s"] for r in saturation}
    if sat.get("off"):
        ratios.append(base.Ratio("requests/s with / without shadowing at saturation", sat.get("on", 0.0) / sat["off"],
                             None))
    if agreement is not None:
        ratios.append(base.Ratio("shadow agreement (bluegreen_shadow_agreement_ratio, digits 1 vs 2)", agreement, None,
                             unit=""))
    else:
        notes.append("the gateway's /metrics showed no bluegreen_shadow_agreement_ratio: no shadow copy was compared.")
    shadowed = [r for r in half if r["target"] == "on"]
    for r in shadowed:
        sent = r["warmup_requests"] + r["requests"]
        r["shadow_share"] = None if r.get("green_rows") is None or not sent else r["green_rows"] / sent
    if any(r["green_rows"] for r in half if r["target"] == "off"):
        notes.append("green inferred rows during a run without shadowing: something else called it.")
    return base.SuiteResult(
        suite="shadow",
        title=f"Shadow traffic at {SHADOW_PERCENT}%: client latency with vs without",
        command=base.reproduce("shadow", ctx),
        settings={
            "model": f"{name}:{version}", "green": f"{name}:{steps.GATEWAY_GREEN_VERSION}",
            "shadow_percent": SHADOW_PERCENT,
            "bodies": len(bodies), "rows_per_request": 1, "request_headers": steps.GATEWAY_REQUEST_HEADERS,
            "server_commands": {"blue": blue_command, "green": green_command},
            "routing": {t: steps.display_routing(r) for t, r in routings.items()},
            "connections": steps.GATEWAY_CONNECTIONS,
            "wrk_threads": wrk.WRK_THREADS, "duration_s": duration_s, "warmup_s": base.WARMUP_S,
            "saturation_order": list(SHADOW_SATURATION_ORDER), "half_load_fraction": steps.HALF_LOAD_FRACTION,
            "half_load_max_rps": steps.HALF_LOAD_MAX_RPS,
            "half_load_order": list(SHADOW_HALF_LOAD_ORDER), "fixed_rate_connections": steps.FIXED_RATE_CONNECTIONS,
            "labels": {"off": "no shadow", "on": f"{SHADOW_PERCENT}% shadowed"},
        },
        sections={
            "saturation": saturation,
            "half_load": {"rate_per_s": rate, "basis_rps": basis, "runs": half, "median_ms": medians},
            "agreement": {"gateway": agreement, "offline": offline},
        },
        ratios=ratios,
        ok=not (any(r["flagged"] for r in saturation) or any(r["flagged"] for r in half)),
        notes=notes,
    )


def render(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", {"off": "no shadow", "on": f"{s['shadow_percent']}% shadowed"})
    half = doc["half_load"]
    agreement = doc.get("agreement", {})
    offline = agreement.get("offline") or {}
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. Blue: `{s['server_commands']['blue']}`; green: "
        f"`{s['server_commands']['green']}`. Two gateways route `{s['model']}` (blue) at weight 100, one with "
        f"`shadow_percent: {s['shadow_percent']}` (copies to green, `{s['green']}`), one with 0. Requests cycle "
        f"through {s['bodies']} held-out digits images, with the extra request header "
        + (", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none")
        + f". Saturation: wrk {s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up "
        f"then {s['duration_s']} s, in the order {', '.join(labels.get(t, t) for t in s['saturation_order'])}. "
        f"Half load: {s['half_load_fraction']:.0%} of the slower gateway's saturated rate, sent at a fixed rate "
        f"({s['warmup_s']} s warm-up then {s['duration_s']} s measured per run) in the order "
        f"{', '.join(labels.get(t, t) for t in s['half_load_order'])}.",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += steps.saturation_table(doc["saturation"], labels, [("Green rows", lambda r: fmt_int(r.get("green_rows")))])
    lines += [
        "",
        f"### Client latency at half load ({fmt_int(half['rate_per_s'])} requests/s)",
        "",
        "Latency in ms from each request's due time (nearest-rank percentiles of the measured window). \"Green "
        "rows\" counts the warm-up too; \"Shadowed\" is green rows over every request sent.",
        "",
        "| Run | Target | Answered/s | p50 | p90 | p95 | p99 | p99.9 | max | Send lag p99 | Green rows | Shadowed "
        "| Non-2xx | No answer | Generator CPU | Gateway CPU | Blue CPU | Green CPU | CPU pressure |",
        "|---:|---|" + "---:|" * 17,
    ]
    for run in half["runs"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        share = run.get("shadow_share")
        lines.append(
            f"| {run['run']} | {labels.get(run['target'], run['target'])}{flag} | {fmt_int(run['answered_per_s'])} | "
            f"{fmt_ms2(lat.get('p50'))} | {fmt_ms2(lat.get('p90'))} | {fmt_ms2(lat.get('p95'))} | "
            f"{fmt_ms2(lat.get('p99'))} | {fmt_ms2(lat.get('p99.9'))} | {fmt_ms2(lat.get('max'))} | "
            f"{fmt_ms2(run['send_lag_ms'].get('p99'))} | {fmt_int(run.get('green_rows'))} | "
            f"{'-' if share is None else format(share, '.1%')} | {run['non_2xx']:,} | "
            f"{sum(run['errors'].values()) + run.get('unfinished', 0):,} | {fmt_cores(cores.get('generator'))} | "
            f"{fmt_cores(cores.get('gateway'))} | {fmt_cores(cores.get('model_server'))} | "
            f"{fmt_cores(cores.get('green_server'))} | {fmt_share(run.get('cpu_pressure'))} |")
    percentiles = [q for q in ("p50", "p90", "p95", "p99") if any(q in m for m in half["median_ms"].values())]
    lines += ["", "| Latency, ms | " + " | ".join(percentiles) + " |", "|---|" + "---:|" * len(percentiles)]
    for target, m in half["median_ms"].items():
        runs = sum(1 for r in half["runs"] if r["target"] == target)
        lines.append(f"| {labels.get(target, target)} (median of {runs} runs) | "
                     + " | ".join(fmt_ms2(m.get(q)) for q in percentiles) + " |")
    gw = agreement.get("gateway")
    lines += ["", f"Agreement of the shadow copies with the answers given (the gateway's "
                  f"`bluegreen_shadow_agreement_ratio` after the runs): {'-' if gw is None else format(gw, '.3f')}. "
                  f"Offline, each of the {s['bodies']} images sent once to each model server directly and compared by "
                  f"the same rule: {offline.get('agreed', '-')} of {offline.get('compared', '-')} agree"
                  + ("" if offline.get("ratio") is None else f" ({offline['ratio']:.3f})")
                  + ". The gateway compares the images the 10% selection happened to pick, so the two can differ by "
                    "the mix of images."]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [base.ratio_row(r) for r in doc["ratios"]]
    return lines + base.closing_lines(doc)



SUITE = base.Suite("shadow", run, render)
