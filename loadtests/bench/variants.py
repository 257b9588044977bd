"""The gateway suite's variants: the same gateway with one feature on, measured by wrk in ABBA order beside the
plain one (client keys, payload logging, a notification sink that never answers), and the helpers they share."""

from __future__ import annotations

import collections
import contextlib
import copy
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench import base, servers, steps
from loadtests.bench.base import LOOPBACK, fmt_int, fmt_ms

#: Order of the notification runs (ABBA): the same gateway but for one webhook sink on a receiver that accepts
#: connections and never answers; both sides take an audited admin write every :data:`WRITE_INTERVAL_S`.
NOTIFY_ORDER = ("gateway", "notify", "notify", "gateway")
WRITE_INTERVAL_S = 0.05
#: The notifier's per-sink queue (gateway.notify.Notifier.queue_size): the writes made before the runs fill it
#: (with one event in flight) so that, during the runs, every event the writes cause is dropped and counted.
NOTIFY_QUEUE = 1000
PREFILL_WRITES = NOTIFY_QUEUE + 100
NOTIFY_TIMEOUT_S = 5.0
MAX_HELD_CONNECTIONS = 64
SPLIT_BODY = {"blue": 100, "green": 0}

Around = Callable[[servers.ServerProcess], contextlib.AbstractContextManager[dict[str, Any]]]


def variant_runs(order: tuple[str, ...], server: servers.ServerProcess, gateway: servers.ServerProcess,
                 variant: servers.ServerProcess, url: str, plain_script: Path, variant_script: Path,
                 duration_s: int, *, around: Around | None = None) -> list[dict[str, Any]]:
    """wrk runs in ``order`` (ABBA: "gateway" is the plain gateway, any other name the ``variant`` one, each with
    its own script), every run with the CPU per request of the proxy it measured. ``around(proxy)`` (when given)
    is entered around each run, warm-up included, and what it yields is added to the run once it has exited."""
    runs = []
    for n, target in enumerate(order, start=1):
        plain = target == "gateway"
        proxy = gateway if plain else variant
        with around(proxy) if around is not None else contextlib.nullcontext({}) as extra:
            run = steps.saturate(n, target, url if plain else url.replace(gateway.url, variant.url),
                                 plain_script if plain else variant_script, duration_s,
                                 {"model_server": server, "proxy": proxy})
        run.update(extra)
        run["proxy_cpu_us_per_request"] = steps.proxy_cpu_us_per_request(run)
        runs.append(run)
    return runs


def cpu_medians(runs: list[dict[str, Any]], variant: str) -> tuple[float, float] | None:
    """Median CPU µs per request of the plain gateway's runs and of the variant's, or None without both."""
    cpu = {t: [r["proxy_cpu_us_per_request"] for r in runs if r["target"] == t
               and r["proxy_cpu_us_per_request"] is not None] for t in ("gateway", variant)}
    if not cpu["gateway"] or not cpu[variant]:
        return None
    return statistics.median(cpu["gateway"]), statistics.median(cpu[variant])


Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def variant_table(runs: list[dict[str, Any]], intro: str, columns: Sequence[Column] = ()) -> list[str]:
    """The ABBA runs of a gateway variant (client keys, payload logging...) beside the plain gateway, with the
    variant's own ``columns`` (a header and how a run shows in it) at the end."""
    if not runs:
        return []
    extra = "".join(f" {name} |" for name, _ in columns)
    lines = ["", intro, "", "| Run | Target | requests/s | p50 ms | p99 ms | Non-2xx | Proxy CPU µs/request |" + extra,
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for r in runs:
        flag = " ⚠" if r.get("flagged") else ""
        lines.append(f"| {r['round']} | {r['target']}{flag} | {fmt_int(r['requests_per_s'])} | "
                     f"{fmt_ms(r['latency_ms'].get('p50'))} | {fmt_ms(r['latency_ms'].get('p99'))} | "
                     f"{r['non_2xx']:,} | {fmt_int(r.get('proxy_cpu_us_per_request'))} |"
                     + "".join(f" {show(r)} |" for _, show in columns))
    return lines


# ---------------------------------------------------------------------------------------- a sink that never answers

class HungReceiver:
    """A listening socket on loopback that accepts connections and never answers (nor reads): the webhook that
    hangs. It holds at most :data:`MAX_HELD_CONNECTIONS` (closing the oldest beyond) and closes all on :meth:`close`."""

    def __init__(self) -> None:
        self._sock = socket.create_server((LOOPBACK, 0), backlog=128)
        self._sock.settimeout(0.2)
        self.url = f"http://{LOOPBACK}:{self._sock.getsockname()[1]}/hook"
        self.accepted = 0
        self._held: collections.deque[socket.socket] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hung-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)
            while len(self._held) > MAX_HELD_CONNECTIONS:
                self._held.popleft().close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sock.close()
        while self._held:
            self._held.popleft().close()


@contextlib.contextmanager
def hung_receiver() -> Iterator[HungReceiver]:
    receiver = HungReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


def split_write(client: httpx.Client, proxy: servers.ServerProcess) -> bool:
    """One audited admin write (the split it already has, unconditionally): a ``bluegreen.weights.changed``
    event. True when the gateway took it."""
    name = steps.GATEWAY_MODEL[0]
    try:
        resp = client.put(f"{proxy.admin_url}/admin/v1/models/{name}/split", json=SPLIT_BODY,
                          headers={"authorization": f"Bearer {proxy.admin_token}", "if-match": "*"})
    except httpx.HTTPError:
        return False
    return resp.is_success


def notification_counts(proxy: servers.ServerProcess) -> dict[str, int]:
    """``bluegreen_notifications_total`` summed by outcome (delivered, retried, failed, dropped) from /metrics."""
    counts: dict[str, int] = {}
    text = servers.admin_get(proxy, "/metrics").text
    for labels, value in re.findall(r"^bluegreen_notifications_total\{([^}]*)\}\s+(\S+)", text, re.MULTILINE):
        outcome = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("outcome", "?")
        counts[outcome] = counts.get(outcome, 0) + int(float(value))
    return counts


@contextlib.contextmanager
def admin_writes(proxy: servers.ServerProcess) -> Iterator[dict[str, Any]]:
    """A background thread making :func:`split_write` every :data:`WRITE_INTERVAL_S` (on a fixed schedule, late
    writes not caught up) while the block runs; then the writes made, the ones refused and, for a gateway with
    sinks, its notification counts so far, in the dict yielded."""
    extra: dict[str, Any] = {}
    stop = threading.Event()
    made = refused = 0

    def write() -> None:
        nonlocal made, refused
        with httpx.Client(timeout=5.0) as client:
            due = time.monotonic()
            while not stop.is_set():
                ok = split_write(client, proxy)
                made, refused = made + 1, refused + (not ok)
                due = max(due + WRITE_INTERVAL_S, time.monotonic())
                stop.wait(due - time.monotonic())

    thread = threading.Thread(target=write, name="admin-writes", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        yield extra
    finally:
        stop.set()
        thread.join(timeout=10.0)
        elapsed = time.monotonic() - started
        extra.update(admin_writes=made, admin_writes_refused=refused,
                     admin_writes_per_s=made / elapsed if elapsed > 0 else 0.0)
        counts = notification_counts(proxy)  # none on a gateway without sinks
        if counts:
            extra["notifications"] = counts


def notify_runs(ctx: base.SuiteContext, routing: Mapping[str, Any], server: servers.ServerProcess,
                gateway: servers.ServerProcess, url: str, duration_s: int) -> dict[str, Any]:
    """The same gateway with and without a webhook sink that never answers, in the order of :data:`NOTIFY_ORDER`,
    each run (both sides) with :func:`admin_writes` going on: what a hung sink costs the data path.

    Before the runs, :data:`PREFILL_WRITES` writes to each gateway fill the sink's queue, so that during the runs
    the notifier reads every new event from the audit stream and drops it (counted in /metrics)."""
    script = ctx.work_dir / "gateway.lua"
    with hung_receiver() as receiver:
        notifying = copy.deepcopy(dict(routing))
        notifying["notifications"] = [{"url": receiver.url, "name": "hung", "format": "cloudevents",
                                       "events": ["*"], "timeout_s": NOTIFY_TIMEOUT_S}]
        with servers.gateway_server(notifying, ctx.work_dir, name="gateway-notify") as notify:
            with httpx.Client(timeout=5.0) as client:
                refused = sum(not split_write(client, proxy) for proxy in (gateway, notify)
                              for _ in range(PREFILL_WRITES))
            if refused:
                raise base.SuiteError(f"{refused} of the admin writes before the notification runs were refused")
            prefilled = wait_for_drops(notify)
            runs = variant_runs(NOTIFY_ORDER, server, gateway, notify, url, script, script, duration_s,
                                around=admin_writes)
            final = notification_counts(notify)
        accepted = receiver.accepted
    return {"runs": runs, "queue_size": NOTIFY_QUEUE, "prefill_writes": PREFILL_WRITES,
            "after_prefill": prefilled, "final": final, "receiver_connections": accepted,
            "write_interval_s": WRITE_INTERVAL_S, "timeout_s": NOTIFY_TIMEOUT_S}


def wait_for_drops(notify: servers.ServerProcess, timeout_s: float = 30.0) -> dict[str, int]:
    """The notification counts once the notifier has read the writes made before the runs (some dropped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = notification_counts(notify)
        if counts.get("dropped", 0) >= PREFILL_WRITES - NOTIFY_QUEUE - 1 or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def notify_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Requests/s, CPU µs per request and p99 of the plain runs and the notify runs (medians), their difference
    and the plain runs' own spread (max − min): the difference is noise unless it is larger."""
    pick: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
        "requests_per_s": lambda r: r.get("requests_per_s"),
        "cpu_us_per_request": lambda r: r.get("proxy_cpu_us_per_request"),
        "p99_ms": lambda r: r["latency_ms"].get("p99")}
    out = {}
    for key, get in pick.items():
        values = {t: [v for r in runs if r["target"] == t and (v := get(r)) is not None] for t in ("gateway", "notify")}
        if not values["gateway"] or not values["notify"]:
            continue
        plain, notify = statistics.median(values["gateway"]), statistics.median(values["notify"])
        spread = max(values["gateway"]) - min(values["gateway"])
        out[key] = {"plain": plain, "notify": notify, "difference": notify - plain, "plain_spread": spread,
                    "within_noise": abs(notify - plain) <= spread}
    return out


def notify_ratios(doc: Mapping[str, Any] | None) -> list[base.Ratio]:
    s = notify_summary(doc["runs"]) if doc else {}
    if "requests_per_s" not in s or "cpu_us_per_request" not in s:
        return []
    rps, cpu = s["requests_per_s"], s["cpu_us_per_request"]
    return [base.Ratio("requests/s with a hung notification sink / without (same run, ABBA, admin writes on both)",
                       rps["notify"] / rps["plain"] if rps["plain"] else 0.0, None),
            base.Ratio("CPU µs per request added by a hung notification sink (same run, notify − plain)",
                       cpu["difference"], None, unit=" µs")]


def _dropped(r: Mapping[str, Any]) -> str:
    counts = r.get("notifications")
    return "-" if counts is None else f"{counts.get('dropped', 0):,}"


def render_notify(doc: Mapping[str, Any] | None) -> list[str]:
    """The notification runs' table, the side-by-side figures and what the sink's counters say."""
    if not doc or not doc.get("runs"):
        return []
    intro = (f"Notifications: the same gateway with and without one CloudEvents webhook sink (`timeout_s: "
             f"{doc['timeout_s']:g}`) on a loopback receiver that accepts connections and never answers, in the order "
             f"{', '.join(NOTIFY_ORDER)}. During every run, both sides, a thread makes an audited admin write "
             f"(`PUT /admin/v1/models/digits/split`, the split unchanged, `If-Match: *`) every "
             f"{doc['write_interval_s'] * 1000:.0f} ms, each a `bluegreen.weights.changed` event; "
             f"{doc['prefill_writes']:,} writes to each gateway before the runs filled the sink's queue "
             f"({doc['queue_size']:,}), so the notifier drops what the runs' writes cause. \"Dropped\" is the "
             "notify gateway's `bluegreen_notifications_total{outcome=\"dropped\"}` after the run (cumulative).")
    lines = variant_table(doc["runs"], intro, [
        ("Admin writes/s", lambda r: "-" if r.get("admin_writes_per_s") is None
         else f"{r['admin_writes_per_s']:.1f}"),
        ("Dropped", _dropped)])
    summary = notify_summary(doc["runs"])
    names = {"requests_per_s": ("requests/s", fmt_int), "cpu_us_per_request": ("Proxy CPU µs/request", fmt_int),
             "p99_ms": ("p99 ms", fmt_ms)}
    lines += ["", "| Median of 2 runs | Plain | Hung sink | Difference | Plain runs' spread | Verdict |",
              "|---|---:|---:|---:|---:|---|"]
    for key, m in summary.items():
        label, fmt = names[key]
        verdict = "unchanged beyond noise" if m["within_noise"] else "**differs by more than the spread**"
        lines.append(f"| {label} | {fmt(m['plain'])} | {fmt(m['notify'])} | {m['difference']:+,.1f} | "
                     f"{m['plain_spread']:,.1f} | {verdict} |")
    final = doc.get("final") or {}
    shown = ", ".join(f"{k} {v:,}" for k, v in sorted(final.items())) or "none"
    lines += ["", f"The hung sink's counters at the end: {shown} (after the writes before the runs: "
              + (", ".join(f"{k} {v:,}" for k, v in sorted((doc.get('after_prefill') or {}).items())) or "none")
              + f"); the receiver accepted {doc.get('receiver_connections', 0):,} connection(s) and answered none."]
    return lines
