"""Gateway settings: one object, built once at start-up and passed through constructors.

Process settings come from ``BLUEGREEN_*`` environment variables (nested ones with ``__``, e.g.
``BLUEGREEN_BREAKER__OPEN_S=2``); routing — models, colors, backends, weights — comes from the YAML routing
file named by ``--config`` / ``BLUEGREEN_CONFIG`` (docs/configuration.md).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.auth import Principal, Role
from gateway.policy import Policy, describe
from serving.http_server import Limits
from serving.tls import server_context

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


def other(color: Color) -> Color:
    return "green" if color == "blue" else "blue"


class Listener(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert_file: Path | None = None
    """PEM certificate chain for both gateway listeners; with ``key_file``, they serve HTTPS only."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted; older clients fail the handshake."""

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both cert_file and key_file")
        return self

    def server_context(self, client_ca_file: Path | None = None) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            if client_ca_file is not None:
                raise ValueError("BLUEGREEN_ADMIN__CLIENT_CA_FILE needs TLS: set BLUEGREEN_TLS__CERT_FILE and "
                                 "BLUEGREEN_TLS__KEY_FILE")
            return None
        return server_context(self.cert_file, self.key_file, self.min_version, client_ca_file)


class AdminListener(Listener):
    client_ca_file: Path | None = None
    """Mutual TLS on the admin listener: clients must present a certificate this CA signed (needs TLS on)."""
    require_if_match: bool = True
    """Refuse admin writes without ``If-Match`` (428): a write must name the state it was based on, so an operator
    never overwrites a change they did not see. ``If-Match: *`` still writes unconditionally, on purpose."""


class BreakerSettings(BaseModel):
    """Per-backend circuit breaker, resilience4j semantics (count-based sliding window)."""

    model_config = ConfigDict(extra="forbid")
    window_size: int = Field(50, ge=1)
    """Calls in the sliding window the failure and slow-call rates are computed over."""
    minimum_calls: int = Field(20, ge=1)
    """No verdict before this many calls are in the window."""
    failure_rate_threshold: float = Field(0.2, gt=0, le=1)
    """Open when at least this fraction of the window failed (5xx, reset, timeout, cancellation)."""
    slow_call_duration_s: float = Field(1.0, gt=0)
    """A call at least this long counts as slow."""
    slow_call_rate_threshold: float = Field(1.0, gt=0, le=1)
    """Open when at least this fraction of the window was slower than ``slow_call_duration_s`` (1.0: only if all)."""
    open_s: float = Field(5.0, gt=0)
    """How long an open breaker refuses calls before letting probes through."""
    half_open_probes: int = Field(3, ge=1)
    """Calls let through per half-open period; the rest go to the other color. Their outcomes decide."""


class UpstreamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ca_file: Path | None = None
    """CA certificates ``https://`` backends are verified against (host name included); unset: the system's."""
    deadline_s: float = Field(2.0, gt=0)
    """Whole-request deadline across attempts; a client's ``x-bluegreen-timeout-ms`` can only shorten it."""
    attempt_timeout_s: float = Field(1.0, gt=0)
    """Deadline of one upstream attempt, so that a hanging color leaves time to retry on the other."""
    connect_timeout_s: float = Field(0.5, gt=0)
    """Opening a connection; a connection that could not be opened is always retried on the other color."""
    pool_size: int = Field(512, ge=1)
    """Most open connections to each backend; a request beyond waits for one to come free, within its deadline."""
    keepalive_s: float = Field(30.0, gt=0)
    """Idle upstream connections are kept this long for reuse."""
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest upstream response body accepted; a larger one fails the attempt."""
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)
    """See ``retry_budget_min``."""
    retry_budget_min: int = Field(10, ge=0)
    """Retries after a sent request are allowed while retries in flight < max(ratio × in flight, min)."""


class ListenerLimits(BaseModel):
    """What the data and admin listeners tolerate from a client (both listeners, the same limits)."""

    model_config = ConfigDict(extra="forbid")
    header_timeout_s: float = Field(10.0, gt=0)
    """The request line and headers must arrive within this time of the request's first byte (else 408)."""
    body_gap_timeout_s: float = Field(15.0, gt=0)
    """Longest silence while a request body is arriving (else 408)."""
    body_timeout_s: float = Field(60.0, gt=0)
    """A whole request body must arrive within this time of the end of its headers (else 408)."""
    keepalive_timeout_s: float = Field(30.0, gt=0)
    """An idle keep-alive client connection is closed after this long."""
    max_headers: int = Field(100, ge=8)
    """Most header lines in a request (else 431)."""
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    """Most bytes of request line and headers together (else 431)."""
    body_budget_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    """Request body bytes buffered by all connections together; a body that would pass it gets 503 +
    Retry-After before it is read (a declared Content-Length counts in full at once)."""
    max_connections: int = Field(10_000, ge=1)
    """Open client connections per listener; beyond it a new connection is closed at once."""

    def for_listener(self, max_body_bytes: int) -> Limits:
        return Limits(header_timeout_s=self.header_timeout_s, body_gap_timeout_s=self.body_gap_timeout_s,
                      body_timeout_s=self.body_timeout_s, keepalive_timeout_s=self.keepalive_timeout_s,
                      max_headers=self.max_headers, max_header_bytes=self.max_header_bytes,
                      max_body_bytes=max_body_bytes, body_budget_bytes=self.body_budget_bytes,
                      max_connections=self.max_connections)


class CacheSettings(BaseModel):
    """The prediction cache: L1 in process, L2 in Redis when ``BLUEGREEN_REDIS_URL`` is set."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    """Cache predictions (requests can still opt out with Cache-Control)."""
    ttl_s: float = Field(300.0, gt=0)
    """How long an entry answers requests."""
    stale_s: float = Field(3600.0, ge=0)
    """How much longer an expired entry is kept to answer when both colors fail (stale-if-error)."""
    l1_max_entries: int = Field(50_000, ge=1)
    """In-process entries kept (least recently used evicted first)."""
    l1_max_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    """In-process bytes of cached responses kept."""
    max_entry_bytes: int = Field(1024 * 1024, ge=1)
    """Responses larger than this are not cached."""
    redis_timeout_s: float = Field(0.05, gt=0, le=0.05)
    """Timeout of every Redis call on the request path (no retries)."""
    redis_open_s: float = Field(2.0, gt=0, le=5.0)
    """How long a failing Redis is left alone before one probe."""
    redis_max_connections: int = Field(64, ge=1)
    """Connections in the cache's Redis pool."""
    max_pending_writes: int = Field(1000, ge=1)
    """Background Redis writes in flight beyond which new writes are dropped."""


class PayloadLogSettings(BaseModel):
    """Prediction payload logging (gateway/payload_log.py): where sampled records go; each model's share is the
    routing file's ``payload_log_percent``, changed live through the admin API."""

    model_config = ConfigDict(extra="forbid")
    dir: Path | None = None
    """Write records as JSON lines to ``<dir>/predictions.jsonl``, rotated to ``predictions.jsonl.1`` ...."""
    url: str | None = None
    """Or POST them in batches (``application/cloudevents-batch+json``) to this http(s) URL."""
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """A log file is rotated before it would grow past this size."""
    max_files: int = Field(5, ge=1, le=1000)
    """Files kept, the current one included; the oldest is deleted on rotation."""
    queue_size: int = Field(10_000, ge=1)
    """Sampled records waiting for the writer; beyond it new ones are dropped (counted), never waited for."""
    batch_size: int = Field(500, ge=1)
    """Most records written or POSTed at once."""
    flush_s: float = Field(1.0, gt=0)
    """An HTTP batch is sent when full or this long after its first record."""
    http_timeout_s: float = Field(2.0, gt=0)
    """Deadline of one POST to ``url``; a batch that fails is dropped (counted), not retried."""

    @model_validator(mode="after")
    def _one_sink(self) -> PayloadLogSettings:
        if self.dir is not None and self.url is not None:
            raise ValueError("payload logging goes to a directory or to a URL, not both")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("the payload log URL must be http(s)")
        return self


class DriftSettings(BaseModel):
    """Input drift per color against each model's reference data (gateway/drift.py)."""

    model_config = ConfigDict(extra="forbid")
    reference_repo: Path | None = None
    """Where ``<model>/<version>/holdout.npz`` reference sets are; default: ``BLUEGREEN_VALIDATION_REPO``.
    Neither set: no drift is measured."""
    sample_percent: int = Field(10, ge=0, le=100)
    """Share of answered requests whose inputs are read into the drift window (0: off)."""
    window_s: float = Field(900.0, gt=0)
    """The rolling window live inputs are compared over."""
    bins: int = Field(10, ge=2, le=50)
    """Quantile bins per feature, cut on the reference data (fewer where its values repeat)."""
    min_rows: int = Field(200, ge=1)
    """Rows a color's window needs before its drift is reported (fewer: absent, not zero)."""
    threshold: float = Field(0.25, gt=0)
    """PSI above which a color is called drifting (0.1-0.25 is the customary "moderate" band)."""
    queue_size: int = Field(1000, ge=1)
    """Sampled bodies waiting to be read; beyond it samples are skipped."""


class ColorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64)
    backends: list[str] = Field(min_length=1, max_length=64)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @field_validator("backends")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://", "dns+http://", "dns+https://")) or len(url) > 512:
                raise ValueError(f"backend must be an http(s) URL, or dns+http(s) for pod discovery: {url[:80]!r}")
        return [u.rstrip("/") for u in v]


def check_weights(weights: dict[str, Any]) -> dict[Color, int]:
    """Weights are integers 0-100 for exactly blue and green, summing to 100."""
    if set(weights) != set(COLORS):
        raise ValueError(f"weights must name exactly 'blue' and 'green', got {sorted(weights)}")
    for color, w in weights.items():
        if type(w) is not int or not 0 <= w <= 100:
            raise ValueError(f"weight of {color} must be an integer 0-100, got {w!r}")
    if weights["blue"] + weights["green"] != 100:
        raise ValueError(f"weights must sum to 100, got {weights['blue'] + weights['green']}")
    return {"blue": weights["blue"], "green": weights["green"]}


def _default_weights() -> dict[Color, int]:
    return {"blue": 100, "green": 0}


class ModelRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colors: dict[Color, ColorConfig]
    weights: dict[Color, StrictInt] = Field(default_factory=_default_weights)
    """Strict, as the admin API is: ``true``, ``50.0`` or ``"50"`` are not weights."""
    candidate: Color | None = None
    """The color a release goes to; default: the color at 0% (green when both carry traffic)."""
    shadow_percent: int = Field(0, ge=0, le=100)
    payload_log_percent: int = Field(0, ge=0, le=100)
    """Share of answered requests logged as prediction records at start-up (the admin API changes it live)."""
    payload_log_inputs: StrictBool = True
    """Privacy: false leaves the request's inputs out of this model's payload records (outputs are kept)."""
    canary: Policy = Field(default_factory=Policy)
    """The model's canary policy: the release plan's defaults with this block's fields on top, validated here so a
    misspelled field stops the gateway at start-up, named (``canary start`` overrides apply on top of it)."""
    max_batch_size: StrictInt | None = Field(None, ge=1)
    """Most rows one request may carry, checked before any backend is called; default: the model servers'
    ``max_batch_size`` from ``/v2/models/{m}/versions/{v}/config`` (the smaller one when both are known)."""
    allow_non_finite: StrictBool | None = None
    """Accept NaN/±Inf in floating-point inputs; default: what the model servers' config says (refused when
    unknown). A model server that refuses them still answers 400."""

    @model_validator(mode="after")
    def _check(self) -> ModelRoute:
        if set(self.colors) != set(COLORS):
            raise ValueError("colors must define both 'blue' and 'green'")
        self.weights = check_weights({str(k): v for k, v in self.weights.items()})
        return self


EVENT_TYPES: tuple[str, ...] = (
    "bluegreen.rollout.started", "bluegreen.rollout.advanced", "bluegreen.rollout.paused",
    "bluegreen.rollout.resumed", "bluegreen.rollout.promoted", "bluegreen.rollout.rolled_back",
    "bluegreen.weights.changed", "bluegreen.color.repointed", "bluegreen.breaker.opened", "bluegreen.breaker.closed",
    "bluegreen.validation.refused", "bluegreen.signal.received", "bluegreen.freeze.set", "bluegreen.freeze.lifted")
"""Every notification type (``gateway/notify.py`` maps audit entries to them)."""


class NotificationSink(BaseModel):
    """One webhook in the routing file's ``notifications:`` list. The secret itself never sits in the file: the
    sink names the environment variable holding it (a Kubernetes Secret mounted as one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(max_length=2048)
    format: Literal["cloudevents", "slack"] = "cloudevents"
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    """Name of the environment variable holding the HMAC key; unset: deliveries are not signed."""
    events: tuple[str, ...] = ("*",)
    """``*``, a family (``bluegreen.rollout.*``) or exact types."""
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    """The ``sink`` label and the name in ``GET /admin/v1/notifications``; default: the URL's host."""
    timeout_s: float = Field(5.0, gt=0, le=60)
    """One attempt's limit (connect, send, answer)."""
    retry_for_s: float = Field(600.0, gt=0, le=86_400)
    """How long an event is retried (exponential backoff with jitter) before it is given up as failed."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one event (or \"*\")")
        families = {t.rsplit(".", 1)[0] + ".*" for t in EVENT_TYPES}
        for e in v:
            if e != "*" and e not in EVENT_TYPES and e not in families:
                raise ValueError(f"unknown event type {e[:80]!r}; known: {', '.join(EVENT_TYPES)}")
        return v

    def wants(self, event_type: str) -> bool:
        return any(e == "*" or e == event_type or (e.endswith(".*") and event_type.startswith(e[:-1]))
                   for e in self.events)


class RoutingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelRoute] = Field(min_length=1)
    notifications: list[NotificationSink] = Field(default_factory=list, max_length=32)
    """Webhooks told of every decision and event (``gateway/notify.py``)."""

    @model_validator(mode="after")
    def _sink_names(self) -> RoutingFile:
        named = [s.name for s in self.notifications if s.name]
        if len(set(named)) != len(named):
            raise ValueError("notifications: two sinks have the same name")
        return self

    @classmethod
    def load(cls, path: Path) -> RoutingFile:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.model_validate(doc)


class TokenEntry(BaseModel):
    """One named admin token in the tokens file: ``{token: "...", roles: [operator]}``."""

    model_config = ConfigDict(extra="forbid")
    token: str
    roles: list[Role] = Field(min_length=1)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLUEGREEN_", env_nested_delimiter="__", extra="ignore")

    config: Path | None = None
    """The YAML routing file (models, colors, backends, weights)."""
    data: Listener = Listener(port=8080)
    """The data listener: V2 endpoints for client apps."""
    admin: AdminListener = AdminListener(port=8081)
    """The admin listener: /admin/v1 (bearer tokens with roles) and /metrics."""
    admin_token: str | None = None
    """A single admin token, audited as ``admin``."""
    admin_tokens: str | None = None
    """Named tokens, ``name:token,name2:token2``."""
    admin_tokens_file: Path | None = None
    """Named tokens from a file: YAML/JSON mapping ``name: token``."""
    client_keys_file: Path | None = None
    """Client keys on the data listener (YAML: name -> key_sha256, models, rate_per_s, burst); unset: open."""
    client_keys_refresh_s: float = Field(1.0, gt=0)
    """How often the client keys file is checked for changes (a change takes effect without a restart)."""
    auth_max_failures: int = Field(10, ge=1)
    """Failed authentications from one address within ``auth_window_s`` before it gets 429."""
    auth_window_s: float = Field(60.0, gt=0)
    """The window of the failed-authentication rule."""
    allow_color_override: bool = False
    """Honour the ``x-bluegreen-color`` request header (tests and debugging; off in production)."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Request bodies larger than this get 413, checked while the body streams in (chunked bodies too)."""
    max_concurrency: int = Field(2048, ge=1)
    """Requests in flight on the data listener (counted once their body is complete) beyond which new ones are
    shed with 503 + Retry-After."""
    state_file: Path | None = None
    """Where the embedded state store keeps weights, colors and the audit log across restarts."""
    window_s: float = Field(60.0, gt=0)
    """Span of the per-color latency/error windows that /stats and the canary read."""
    history_interval_s: float = Field(10.0, gt=0, le=600)
    """How often the console's history (``/admin/v1/models/{m}/history``) takes a point; it keeps an hour."""
    graceful_shutdown_s: float = Field(30.0, gt=0)
    """On SIGTERM, how long in-flight requests may take to finish before connections are closed."""
    redis_url: str | None = None
    """Redis (``redis://127.0.0.1:6379/0``) for the shared cache tier and the state replicas share (weights,
    colors, rollouts, audit stream, controller lease, feedback); unset: one process, in-memory state."""
    controller_lease_ttl_s: float = Field(5.0, ge=0.5, le=300)
    """With Redis: how long the controller lease lives unrenewed (renewed every third of it), so how long the
    rollouts wait after their holder dies before another replica takes over. Shorter fails over sooner but lets
    a stall of about 0.8 of it in the holder cost the lease; all replicas should use the same value."""
    validation_repo: Path | None = None
    """Where ``bluegreen validate`` reports live (``<repo>/<model>/<version>/validation.json``); when set,
    ``canary start`` refuses a candidate version without a passing report unless forced. ``bluegreen up``
    sets it to the model repository."""
    discovery_refresh_s: float = Field(5.0, gt=0)
    """How often ``dns+http://name:port`` backends are re-resolved (pods behind a headless Service)."""
    discovery_file: Path | None = None
    """Resolve ``dns+`` names from this JSON file (``{"name": ["host:port", ...]}``) instead of DNS."""
    telemetry: bool = True
    """Record request metrics (Prometheus on the admin /metrics, OTLP when OTEL_EXPORTER_OTLP_* is set)."""
    breaker: BreakerSettings = BreakerSettings()
    cache: CacheSettings = CacheSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    limits: ListenerLimits = ListenerLimits()
    tls: TlsSettings = TlsSettings()
    payload_log: PayloadLogSettings = PayloadLogSettings()
    drift: DriftSettings = DriftSettings()

    def routing(self) -> RoutingFile:
        if self.config is None:
            raise ValueError("no routing file: pass --config FILE or set BLUEGREEN_CONFIG")
        return RoutingFile.load(self.config)

    def tokens(self) -> dict[str, Principal]:
        """token -> its holder (name and roles), from every configured source. The tokens file maps a name to a
        token (role ``admin``, the first form) or to ``{token: ..., roles: [...]}``; the environment's tokens
        are ``admin``."""
        named: dict[str, tuple[str, frozenset[str]]] = {}
        admin = frozenset({"admin"})
        if self.admin_tokens_file is not None:
            doc = yaml.safe_load(self.admin_tokens_file.read_text()) or {}
            if not isinstance(doc, dict):
                raise ValueError(f"{self.admin_tokens_file}: expected a mapping of name: token")
            for key, value in doc.items():
                if isinstance(value, dict):
                    try:
                        entry = TokenEntry.model_validate(value)
                    except ValidationError as exc:  # never echo the input: it holds a token
                        raise ValueError(f"{self.admin_tokens_file}: {key}: "
                                         f"{describe(exc)}") from None
                    named[str(key)] = (entry.token, frozenset(entry.roles))
                else:
                    named[str(key)] = (str(value), admin)
        if self.admin_tokens:
            for pair in self.admin_tokens.split(","):
                name, sep, token = pair.strip().partition(":")
                if not sep or not name or not token:
                    raise ValueError("BLUEGREEN_ADMIN_TOKENS must be name:token pairs separated by commas")
                named[name] = (token, admin)
        if self.admin_token:
            named.setdefault("admin", (self.admin_token, admin))
        for name, (token, _) in named.items():
            if len(token) < 16:
                raise ValueError(f"admin token {name!r} is shorter than 16 characters")
        return {token: Principal(name, roles) for name, (token, roles) in named.items()}
