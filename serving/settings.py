"""Model-server settings: ``BLUEGREEN_SERVING_*`` environment variables, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.repository import DEFAULT_REPOSITORY


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLUEGREEN_SERVING_", extra="forbid")

    repo: Path = DEFAULT_REPOSITORY
    """Model repository root (``<repo>/<name>/<version>/model.onnx``)."""
    models: list[str] = Field(default_factory=lambda: ["digits"])
    """Models to serve, ``NAME`` (newest version) or ``NAME:VERSION``; several versions may be served at once."""
    host: str = "127.0.0.1"
    """Listen address (Kubernetes: 0.0.0.0)."""
    port: int = Field(8001, ge=0, le=65535)
    """Listen port."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes CUDA when the installed onnxruntime offers it, else the CPU."""
    threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads; 0 sizes them to the cores this process may use."""
    spin_wait: bool = False
    """Let ONNX Runtime's intra-op threads spin between runs (faster hand-offs, but they burn cores the HTTP
    side needs on a shared machine)."""
    instances: int = Field(1, ge=1)
    """Model instances (worker threads) per model, each running one batch at a time (Triton's instance groups)."""
    inline_run_max_us: float = Field(200.0, ge=0)
    """Models whose largest batch runs within this (measured at warm-up) run on the event loop, without the hop
    to a worker thread, which costs more than they do; 0 always uses worker threads."""
    max_batch_size: int = Field(64, ge=1)
    """Most rows combined into one run; 1 turns dynamic batching off (every request is one plain run)."""
    max_queue_delay_ms: float = Field(2.0, ge=0)
    """Upper bound on how long a queued request may wait for a batch to fill; the batcher never waits when a
    model instance is free (a lone request runs at once; arrivals during a run go together when it ends)."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests waiting per model beyond which new ones get 503 + Retry-After."""
    max_request_rows: int = Field(1024, ge=1)
    """Largest batch dimension one request may carry (larger requests run alone, beyond this they get 400)."""
    allow_non_finite: bool = False
    """Accept NaN and ±Inf in floating-point inputs (binary tensors; JSON cannot carry them). Off: such requests
    get 400 before any model run. Reported by ``GET /v2/models/{m}/config``, so the gateway refuses the same."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Request bodies larger than this get 413, checked while the body streams in (chunked bodies too)."""
    warmup_runs: int = Field(3, ge=0)
    """Inferences run (batch 1 and max batch) before the server reports ready."""
    fault_latency_ms: float = Field(0.0, ge=0)
    """Drills only: latency added to every inference."""
    fault_error_rate: float = Field(0.0, ge=0, le=1)
    """Drills only: this fraction of inference requests is answered 500, spread evenly (deterministic)."""
    graceful_shutdown_s: float = Field(30.0, gt=0)
    """On SIGTERM, how long in-flight requests may take to finish."""
    tls_cert: Path | None = None
    """PEM certificate chain: with ``tls_key``, the server speaks HTTPS only (``serve-model --tls-cert``)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted."""

    @model_validator(mode="after")
    def _tls_pair(self) -> ServingSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return self
