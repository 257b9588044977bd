"""``bluegreen up``: the whole local stack as child processes, supervised.

Blue and green model servers and the gateway (embedded state, kept in a state file so weights survive a
restart). Start-up fails fast, with a non-zero exit and before anything says "ready": a port already taken is
named before any child starts, and a child that exits while starting is reported with the tail of its log (a
newcomer on a busy port used to get "ready" and a token, then a stack of dead children). Once ready, a child that
dies is reported and the others keep running — the gateway degrades as it would in production. Ctrl-C or SIGTERM
stops every child (SIGTERM, then SIGKILL after a grace period); children also get SIGTERM from the kernel if
``up`` itself is killed (PR_SET_PDEATHSIG), so none is left behind.

The admin token lives in the state directory (``admin-token``, mode 0600), created on the first run and reused
after, so that a token exported in another terminal keeps working across restarts; ``BLUEGREEN_ADMIN_TOKEN`` in
the environment overrides it. ``up`` prints ``export`` lines for the CLI (``BLUEGREEN_ADMIN_URL``,
``BLUEGREEN_ADMIN_TOKEN``) ready to paste.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import yaml

from models.build import build_all
from serving.process import ChildFailed, ChildProcess, http_ok, port_taken
from serving.repository import DEFAULT_REPOSITORY, ModelRef, Repository

TOKEN_FILE = "admin-token"


class StartError(Exception):
    """``up`` cannot start the stack (a port taken, a child that exited while starting): exit status 1."""


@dataclass
class Child:
    name: str
    args: list[str]
    ready_url: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    process: ChildProcess | None = None
    reported: bool = False

    def start(self, log_dir: Path) -> None:
        label = self.name if self.name == "gateway" else f"{self.name} model server"  # for messages
        self.process = ChildProcess.start(label, self.args, log_dir / f"{self.name}.log",
                                          env={**os.environ, **self.env}, append=True, die_with_parent=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


def admin_token(state_dir: Path) -> str:
    """The stack's admin token: ``BLUEGREEN_ADMIN_TOKEN`` if set, else the one kept in ``state_dir`` (created once,
    readable by its owner only)."""
    if os.environ.get("BLUEGREEN_ADMIN_TOKEN"):
        return os.environ["BLUEGREEN_ADMIN_TOKEN"]
    path = state_dir / TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return token


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
                                 "--device", o.device], f"http://{o.host}:{port}/v2/health/ready", port)

        gateway_env = {"BLUEGREEN_ADMIN_TOKEN": token, "BLUEGREEN_STATE_FILE": str(o.state_dir / "state.json"),
                       "BLUEGREEN_VALIDATION_REPO": str(repository.root),
                       "BLUEGREEN_DATA__HOST": o.host, "BLUEGREEN_DATA__PORT": str(o.port),
                       "BLUEGREEN_ADMIN__HOST": o.host, "BLUEGREEN_ADMIN__PORT": str(o.admin_port)}
        return [server("blue", f"{blue.name}:{blue_version}", o.blue_port),
                server("green", f"{green.name}:{green_version}", o.green_port),
                Child("gateway", [*cli, "gateway", "--config", str(config)], f"http://{o.host}:{o.port}/v2/health/ready",
                      o.port, gateway_env)]

    def check_ports(self) -> None:
        """Every port the stack listens on must be free now (bound, then released): StartError naming the first
        one taken, before any child starts."""
        o = self.opts
        wanted = {"gateway data port (--port)": o.port, "admin port (--admin-port)": o.admin_port,
                  "blue model server port (--blue-port)": o.blue_port,
                  "green model server port (--green-port)": o.green_port}
        seen: dict[int, str] = {}
        for what, port in wanted.items():
            if port in seen:
                raise StartError(f"the {what} and the {seen[port]} are both {port}: give each its own port")
            seen[port] = what
            why = port_taken(o.host, port)
            if why is not None:
                raise StartError(f"port {port} on {o.host} ({what}) is not available: {why}. Stop what listens "
                                 f"there (ss -ltnp 'sport = :{port}') or choose another port.")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to every child at once, then each one waited for (SIGKILL after the shared grace)."""
        self._stopping = True
        started = [c.process for c in self.children if c.process is not None]
        running = {p.pid for p in started if p.alive()}
        for p in started:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in started:
            if p.stop(max(0.1, deadline - time.monotonic())) == -signal.SIGKILL and p.pid in running:
                self._say(f"the {p.name} did not stop in {grace_s:.0f}s: killed it")

    def run(self) -> int:
        o = self.opts
        try:
            self.check_ports()
        except StartError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        token = admin_token(o.state_dir)
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
            try:
                for child in servers:
                    child.start(log_dir)
                for child in servers:
                    self._wait_started(child, deadline)
                # The gateway starts once the model servers answer: it learns their signatures at start.
                if not self._stopping:
                    gateway.start(log_dir)
                    self._wait_started(gateway, deadline)
            except StartError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                self._say("start-up failed; stopping")
                return 1
            if not self._stopping:
                self._say_ready(token, log_dir)
            while not self._stopping:
                for child in self.children:
                    if not child.alive() and not child.reported:
                        child.reported = True
                        code = child.process.returncode if child.process else None
                        self._say(f"{child.name} exited with status {code}; the rest keep running"
                                  + (" (the gateway degrades to the other color)" if child.name != "gateway" else ""))
                time.sleep(0.2)
        finally:
            self._say("stopping")
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def _wait_started(self, child: Child, deadline: float) -> None:
        """Until ``child`` answers ready: StartError, with its log's tail, if it exits or the deadline passes."""
        assert child.process is not None
        try:
            child.process.wait_ready(http_ok(child.ready_url), max(0.0, deadline - time.monotonic()),
                                     interval_s=0.1, cancelled=lambda: self._stopping)
        except ChildFailed as exc:
            raise StartError(str(exc)) from None

    def _say_ready(self, token: str, log_dir: Path) -> None:
        o = self.opts
        admin = f"http://{o.host}:{o.admin_port}"
        self._say("ready")
        self._say(f"  predictions  http://{o.host}:{o.port}/v2/models/{ModelRef.parse(o.blue).name}/infer")
        self._say(f"  admin        {admin}/admin/v1/models")
        self._say(f"  console      {admin}/ui  (sign in with the admin token)")
        self._say(f"  blue         http://{o.host}:{o.blue_port}  ({o.blue})")
        self._say(f"  green        http://{o.host}:{o.green_port}  ({o.green})")
        kept = "from BLUEGREEN_ADMIN_TOKEN" if os.environ.get("BLUEGREEN_ADMIN_TOKEN") else \
            f"kept in {o.state_dir / TOKEN_FILE}"
        self._say(f"  admin token  {token}  ({kept})")
        self._say(f"  logs         {log_dir}/   state {o.state_dir / 'state.json'}")
        self._say("For the bluegreen CLI in another terminal, paste:")
        print(f"export BLUEGREEN_ADMIN_URL={admin}", flush=True)
        print(f"export BLUEGREEN_ADMIN_TOKEN={token}", flush=True)
        self._say("Ctrl-C stops everything.")
