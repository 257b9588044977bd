"""``bluegreen up``: the whole local stack as child processes, supervised.

Blue and green model servers and the gateway (embedded state, kept in a state file so weights survive a
restart). A child that dies is reported and the others keep running — the gateway degrades as it would in
production. Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period); children also
get SIGTERM from the kernel if ``up`` itself is killed (PR_SET_PDEATHSIG), so none is left behind.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import yaml

from models.build import build_all
from serving.repository import DEFAULT_REPOSITORY, ModelRef, Repository

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    args: list[str]
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    reported: bool = False

    def start(self, log_dir: Path) -> None:
        log = (log_dir / f"{self.name}.log").open("ab")
        self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                      preexec_fn=_die_with_parent, start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class StackOptions:
    blue: str = "digits:1"
    green: str = "digits:2"
    repo: Path | None = None
    host: str = "127.0.0.1"
    blue_port: int = 8001
    green_port: int = 8002
    port: int = 8080
    admin_port: int = 8081
    state_dir: Path = Path(".bluegreen")
    device: str = "auto"
    ready_timeout_s: float = 120.0


class Stack:
    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.children: list[Child] = []
        self._stopping = False

    def _say(self, text: str) -> None:
        print(f"[bluegreen up] {text}", flush=True)

    def plan(self, token: str) -> list[Child]:
        o = self.opts
        blue, green = ModelRef.parse(o.blue), ModelRef.parse(o.green)
        if blue.name != green.name:
            raise ValueError(f"blue and green must be versions of one model, got {blue} and {green}")
        repo_args = ["--repo", str(o.repo)] if o.repo else []
        repository = Repository(o.repo or DEFAULT_REPOSITORY)
        _, blue_version, _ = repository.resolve(blue)
        _, green_version, _ = repository.resolve(green)
        o.state_dir.mkdir(parents=True, exist_ok=True)
        routing = {"models": {blue.name: {
            "colors": {"blue": {"version": blue_version, "backends": [f"http://{o.host}:{o.blue_port}"]},
                       "green": {"version": green_version, "backends": [f"http://{o.host}:{o.green_port}"]}},
            "weights": {"blue": 100, "green": 0}}}}
        config = o.state_dir / "routing.yaml"
        config.write_text(yaml.safe_dump(routing, sort_keys=False))
        cli = [sys.executable, "-m", "gateway.cli"]

        def server(color: str, ref: str, port: int) -> Child:
            return Child(color, [*cli, "serve-model", *repo_args, "--model", ref, "--host", o.host, "--port", str(port),
                                 "--device", o.device], f"http://{o.host}:{port}/v2/health/ready")

        gateway_env = {"BLUEGREEN_ADMIN_TOKEN": token, "BLUEGREEN_STATE_FILE": str(o.state_dir / "state.json"),
                       "BLUEGREEN_VALIDATION_REPO": str(repository.root),
                       "BLUEGREEN_DATA__HOST": o.host, "BLUEGREEN_DATA__PORT": str(o.port),
                       "BLUEGREEN_ADMIN__HOST": o.host, "BLUEGREEN_ADMIN__PORT": str(o.admin_port)}
        return [server("blue", f"{blue.name}:{blue_version}", o.blue_port),
                server("green", f"{green.name}:{green_version}", o.green_port),
                Child("gateway", [*cli, "gateway", "--config", str(config)], f"http://{o.host}:{o.port}/v2/health/ready",
                      gateway_env)]

    def _wait_ready(self, child: Child, deadline: float) -> bool:
        while time.monotonic() < deadline and not self._stopping:
            if not child.alive():
                return False
            try:
                if httpx.get(child.ready_url, timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def stop(self, grace_s: float = 15.0) -> None:
        self._stopping = True
        for child in self.children:
            if child.alive():
                assert child.popen is not None
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if child.popen is None:
                continue
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"{child.name} did not stop in {grace_s:.0f}s: killing it")
                child.popen.kill()
                child.popen.wait(5)

    def run(self) -> int:
        o = self.opts
        token = os.environ.get("BLUEGREEN_ADMIN_TOKEN") or secrets.token_urlsafe(24)
        for line in build_all(o.repo or DEFAULT_REPOSITORY, only={ModelRef.parse(o.blue).name}):
            if line.startswith("built"):
                self._say(line)
        self.children = self.plan(token)

        def on_signal(sig: int, frame: FrameType | None) -> None:
            self._stopping = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log_dir = o.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            deadline = time.monotonic() + o.ready_timeout_s
            servers, gateway = self.children[:-1], self.children[-1]
            for child in servers:
                child.start(log_dir)
            # The gateway starts once the model servers answer (or fail): it learns their signatures at start.
            for child in [*servers, gateway]:
                if child is gateway:
                    gateway.start(log_dir)
                if not self._wait_ready(child, deadline) and not self._stopping:
                    self._say(f"{child.name} is not ready (see {log_dir / (child.name + '.log')}); continuing")
            if not self._stopping:
                self._say("ready")
                self._say(f"  predictions  http://{o.host}:{o.port}/v2/models/{ModelRef.parse(o.blue).name}/infer")
                self._say(f"  admin        http://{o.host}:{o.admin_port}/admin/v1/models")
                self._say(f"  blue         http://{o.host}:{o.blue_port}  ({o.blue})")
                self._say(f"  green        http://{o.host}:{o.green_port}  ({o.green})")
                self._say(f"  admin token  {token}")
                self._say(f"  logs         {log_dir}/   state {o.state_dir / 'state.json'}")
                self._say("Ctrl-C stops everything.")
            while not self._stopping:
                for child in self.children:
                    if not child.alive() and not child.reported:
                        child.reported = True
                        code = child.popen.returncode if child.popen else None
                        self._say(f"{child.name} exited with status {code}; the rest keep running"
                                  + (" (the gateway degrades to the other color)" if child.name != "gateway" else ""))
                time.sleep(0.2)
        finally:
            self._say("stopping")
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0
