"""The tests' way to start real processes on free loopback ports and always clean them up: a thin layer over
serving/process.py (the one process helper ``bluegreen up``, the bench and the validation gate use too), with
the tests' defaults (the checkout as working directory, this environment plus a few variables, AssertionError on
a timeout)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

from serving.process import ChildProcess, http_ok, redis_pong, wait_for
from serving.process import free_port as free_port

ROOT = Path(__file__).resolve().parent.parent
BLUEGREEN = [sys.executable, "-m", "gateway.cli"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail (AssertionError) after ``timeout`` seconds."""
    try:
        return wait_for(predicate, timeout, interval_s=interval, what=what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def _name(args: Sequence[str]) -> str:
    """What a failure message calls the process: ``bluegreen gateway``, ``redis-server``..."""
    args = [str(a) for a in args]
    if args[1:3] == ["-m", "gateway.cli"] and len(args) > 3:
        return f"bluegreen {args[3]}"
    return Path(args[0]).name


class Proc:
    """A child process with its log captured to a file; stopped (SIGTERM, then SIGKILL) on :meth:`stop`."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.child = ChildProcess.start(_name(args), args, log_path, env={**os.environ, **(env or {})}, cwd=ROOT)
        self.args = self.child.args
        self.log_path = log_path
        self.popen = self.child.popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.child.log()

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.child.stop(timeout)


def wait_ready(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; fails at once, with the log's tail, if the process exits first."""
    proc.child.wait_ready(http_ok(url), timeout)


def start_model_server(tmp_path: Path, models: Sequence[str], *, port: int | None = None,
                       extra: Sequence[str] = (), env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """Start ``bluegreen serve-model`` on a free loopback port; return the process and its base URL."""
    port = port or free_port()
    args = [*BLUEGREEN, "serve-model", "--host", "127.0.0.1", "--port", str(port)]
    for m in models:
        args += ["--model", m]
    args += list(extra)
    proc = Proc(args, tmp_path / f"serve-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/v2/health/ready")
    except BaseException:
        proc.stop()
        raise
    return proc, url


ADMIN_TOKEN = "test-admin-token-0123456789"


def routing(blue: Sequence[str], green: Sequence[str], *, weights: tuple[int, int] = (100, 0),
            versions: tuple[str, str] = ("1", "2"), model: str = "digits") -> dict:  # type: ignore[type-arg]
    return {"models": {model: {
        "colors": {"blue": {"version": versions[0], "backends": list(blue)},
                   "green": {"version": versions[1], "backends": list(green)}},
        "weights": {"blue": weights[0], "green": weights[1]}}}}


def start_gateway(tmp_path: Path, routing_doc: dict, env: dict[str, str] | None = None,  # type: ignore[type-arg]
                  name: str = "gateway") -> tuple[Proc, str, str]:
    """Start ``bluegreen gateway`` on free loopback ports; return the process, data URL and admin URL."""
    import json

    config = tmp_path / f"{name}-routing.json"
    config.write_text(json.dumps(routing_doc))
    data_port, admin_port = free_port(), free_port()
    full_env = {"BLUEGREEN_DATA__PORT": str(data_port), "BLUEGREEN_ADMIN__PORT": str(admin_port),
                "BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_ALLOW_COLOR_OVERRIDE": "true", **(env or {})}
    proc = Proc([*BLUEGREEN, "gateway", "--config", str(config)], tmp_path / f"{name}.log", full_env)
    data, admin = f"http://127.0.0.1:{data_port}", f"http://127.0.0.1:{admin_port}"
    try:
        wait_ready(proc, f"{data}/v2/health/ready", timeout=30)
    except BaseException:
        proc.stop()
        raise
    return proc, data, admin


@contextmanager
def digits_stack(tmp_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Blue (digits:1) and green (digits:2) model servers with a gateway in front (blue 100, green 0): the data URL,
    the admin URL and the two colors' URLs; everything stops when the block ends, whatever raised."""
    with ExitStack() as stack:
        blue, blue_url = start_model_server(tmp_path, ["digits:1"])
        stack.callback(blue.stop)
        green, green_url = start_model_server(tmp_path, ["digits:2"])
        stack.callback(green.stop)
        gw, data, admin = start_gateway(tmp_path, routing([blue_url], [green_url]))
        stack.callback(gw.stop)
        yield data, admin, blue_url, green_url


def admin_headers() -> dict[str, str]:
    """The admin token, and ``If-Match: *`` so that a write which races no one is explicitly unconditional (the
    gateway refuses writes without If-Match, 428); a test about ETags overrides it with the ETag it read."""
    return {"authorization": f"Bearer {ADMIN_TOKEN}", "if-match": "*"}


def start_redis(tmp_path: Path, port: int | None = None) -> tuple[Proc, int]:
    """A private ``redis-server`` on a free loopback port, nothing persisted; the tests kill it at will."""
    import shutil

    import pytest

    exe = shutil.which("redis-server")
    if exe is None:  # never a skip: CI must run the Redis tests
        pytest.fail("redis-server is not installed (Debian package redis-server)")
    port = port or free_port()
    proc = Proc([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_path)], tmp_path / f"redis-{port}.log")

    proc.child.wait_ready(redis_pong(port), 10)
    return proc, port


def start_prometheus(tmp_path: Path, targets: Sequence[str], *, scrape_interval_s: float = 1.0,
                     job: str = "gateway") -> tuple[Proc, str]:
    """A private Prometheus (Debian package ``prometheus``) on a free loopback port scraping ``targets``
    (``host:port``, path ``/metrics``) every ``scrape_interval_s``; its TSDB lives in ``tmp_path``. Returns the
    process and its base URL (HTTP API under ``/api/v1``)."""
    import json
    import shutil

    import pytest

    exe = shutil.which("prometheus")
    if exe is None:  # never a skip: CI must run the Prometheus test
        pytest.fail("prometheus is not installed (Debian package prometheus)")
    port = free_port()
    interval = f"{int(scrape_interval_s * 1000)}ms"
    config = tmp_path / f"prometheus-{port}.yml"
    # JSON is YAML: no YAML writer needed for a generated config.
    config.write_text(json.dumps({
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}]}))
    proc = Proc([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / f'prometheus-{port}-data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                tmp_path / f"prometheus-{port}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/-/ready", timeout=30)
    except BaseException:
        proc.stop()
        raise
    return proc, url
