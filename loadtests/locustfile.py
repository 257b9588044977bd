"""Realistic load on the bluegreen gateway, for locust.

Who the simulated users are:

- **PredictionClient** (most users): each holds one sticky routing key (``x-bluegreen-key``), as an app
  session would, and sends single-row predictions to ``/v2/models/<model>/infer``. A share of them repeat an
  input from a small shared pool (the gateway's cache answers those: ``x-bluegreen-cache: hit``), the rest are
  fresh (a held-out row with a few pixels nudged, so no two are alike). Bodies are V2 JSON or, for a share,
  the binary tensor extension (``Inference-Header-Content-Length``; binary input, the ``label`` output asked
  back in binary too). Every request carries a V2 ``id``; for a share of the JSON answers the client later
  posts the ground truth to ``/feedback/v1/models/<model>`` as ``{"id": ..., "label": ...}`` (the held-out
  label), which feeds the gateway's online accuracy.
- **Operator** (one user, and only when ``BLUEGREEN_ADMIN_TOKEN`` is set): now and then reads the split and
  the per-color stats and shifts the weights with ``GET`` + ``PUT /admin/v1/models/<model>/split`` and
  ``If-Match``. A 409 (a canary rollout owns the weights) or 412 (someone else changed them first) is an
  expected answer, not a failure.

Request names in the statistics: ``infer json repeat``, ``infer json fresh``, ``infer binary repeat``,
``infer binary fresh``, ``feedback``, ``admin split get``, ``admin split put``, ``admin stats``.

Settings (environment variables):

=====================================  ========================  ==================================================
``BLUEGREEN_LOCUST_MODEL``             ``digits``                model to predict with
``BLUEGREEN_LOCUST_REPEAT_SHARE``      ``0.5``                   share of predictions that repeat a pooled input
``BLUEGREEN_LOCUST_POOL_SIZE``         ``32``                    distinct inputs in the repeated pool
``BLUEGREEN_LOCUST_BINARY_SHARE``      ``0.3``                   share sent with the binary tensor extension
``BLUEGREEN_LOCUST_FEEDBACK_SHARE``    ``0.2``                   share of JSON answers that get a feedback post
``BLUEGREEN_LOCUST_WAIT_S``            ``0.05,0.3``              a client's think time between requests (min,max)
``BLUEGREEN_LOCUST_DATA``              newest ``holdout.npz``    rows (``input``) and ground truth (``label``)
``BLUEGREEN_LOCUST_SEED``              ``0``                     seeds the pool and every user's choices
``BLUEGREEN_ADMIN_TOKEN``              unset                     enables the operator user
``BLUEGREEN_ADMIN_URL``                ``http://127.0.0.1:8081`` the admin listener
``BLUEGREEN_LOCUST_OPERATOR_WAIT_S``   ``2,6``                   the operator's think time (min,max)
=====================================  ========================  ==================================================

Reported percentiles are 50/90/95/99/99.9 (``PERCENTILES_TO_REPORT`` below; the HTML charts p50/p95/p99).

Headless run against ``bluegreen up`` (CSV and HTML written; exit status 1 when any request failed)::

    locust -f loadtests/locustfile.py --headless -u 10 -r 5 -t 30s --host http://127.0.0.1:8080 \\
        --csv loadtests/out/run --html loadtests/out/run.html --only-summary

``loadtests/out/run_stats.csv`` then holds one row per request name and an ``Aggregated`` row (``Failure
Count``, percentiles), ``run_failures.csv`` one row per distinct failure.

Locust is for scenarios, not for throughput: on a 2-core machine locust (one process, gevent) competes for the
cores with the gateway and both model servers, and saturates before they do. Throughput ratios come from
``bluegreen bench`` (wrk, one run at a time); a locust run says whether this mix of users is served without
errors and at what latency, at the load it could generate.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from locust import FastHttpUser, HttpUser, between, stats, task

stats.PERCENTILES_TO_REPORT = [0.5, 0.9, 0.95, 0.99, 0.999]
stats.PERCENTILES_TO_STATISTICS = [0.5, 0.95, 0.99]
stats.PERCENTILES_TO_CHART = [0.5, 0.95, 0.99]

ROOT = Path(__file__).resolve().parent.parent
HEADER_LENGTH = "Inference-Header-Content-Length"
EXPECTED_ADMIN_REFUSALS = (409, 412)  # an active canary owns the weights; a concurrent writer won


def _env_float(name: str, default: float, low: float = 0.0, high: float = 1.0) -> float:
    value = float(os.environ.get(name, default))
    if not low <= value <= high:
        raise ValueError(f"{name} must be within [{low}, {high}], got {value}")
    return value


def _env_range(name: str, default: str) -> tuple[float, float]:
    low, _, high = os.environ.get(name, default).partition(",")
    lo, hi = float(low), float(high or low)
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must be 'min,max' seconds with 0 <= min <= max")
    return lo, hi


MODEL = os.environ.get("BLUEGREEN_LOCUST_MODEL", "digits")
REPEAT_SHARE = _env_float("BLUEGREEN_LOCUST_REPEAT_SHARE", 0.5)
BINARY_SHARE = _env_float("BLUEGREEN_LOCUST_BINARY_SHARE", 0.3)
FEEDBACK_SHARE = _env_float("BLUEGREEN_LOCUST_FEEDBACK_SHARE", 0.2)
POOL_SIZE = int(_env_float("BLUEGREEN_LOCUST_POOL_SIZE", 32, 1, 1_000_000))
SEED = int(os.environ.get("BLUEGREEN_LOCUST_SEED", "0"))
WAIT_S = _env_range("BLUEGREEN_LOCUST_WAIT_S", "0.05,0.3")
OPERATOR_WAIT_S = _env_range("BLUEGREEN_LOCUST_OPERATOR_WAIT_S", "2,6")
ADMIN_TOKEN = os.environ.get("BLUEGREEN_ADMIN_TOKEN", "")
ADMIN_URL = os.environ.get("BLUEGREEN_ADMIN_URL", "http://127.0.0.1:8081").rstrip("/")


def _data_path() -> Path:
    """``BLUEGREEN_LOCUST_DATA``, else the held-out split of the model's newest built version."""
    if os.environ.get("BLUEGREEN_LOCUST_DATA"):
        return Path(os.environ["BLUEGREEN_LOCUST_DATA"])
    folder = ROOT / "models" / "repository" / MODEL
    versions = sorted((p for p in folder.glob("*/holdout.npz")), key=lambda p: (len(p.parent.name), p.parent.name))
    if not versions:
        raise FileNotFoundError(f"no held-out data for {MODEL!r} under {folder}: run `bluegreen build-models` "
                                "or set BLUEGREEN_LOCUST_DATA")
    return versions[-1]


def _load_rows() -> tuple[np.ndarray, np.ndarray]:
    with np.load(_data_path(), allow_pickle=False) as data:
        return np.asarray(data["input"], dtype=np.float32), np.asarray(data["label"]).astype(np.int64)


ROWS, LABELS = _load_rows()
_pool_rng = np.random.default_rng(SEED)
POOL = _pool_rng.choice(len(ROWS), size=min(POOL_SIZE, len(ROWS)), replace=False)  # row indices, shared by users
PIXEL_MAX = float(ROWS.max()) if ROWS.size else 16.0
_user_numbers = itertools.count()


def json_body(request_id: str, row: np.ndarray) -> bytes:
    return orjson.dumps({"id": request_id, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, row.size],
                                                       "data": row.tolist()}],
                         "outputs": [{"name": "label"}]})


def binary_body(request_id: str, row: np.ndarray) -> tuple[bytes, int]:
    """The binary tensor extension: a JSON header, then the raw little-endian FP32 input; label asked in binary."""
    data = row.astype("<f4").tobytes()
    header = orjson.dumps({"id": request_id,
                           "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, row.size],
                                       "parameters": {"binary_data_size": len(data)}}],
                           "outputs": [{"name": "label", "parameters": {"binary_data": True}}]})
    return header + data, len(header)


def parse_answer(body: bytes, header_length: str | None) -> tuple[str | None, int | None]:
    """(echoed id, predicted label) from a V2 answer, JSON or binary; raises ValueError when malformed."""
    n = int(header_length) if header_length is not None else len(body)
    doc = orjson.loads(body[:n])
    out = next((o for o in doc.get("outputs", ()) if o.get("name") == "label"), None)
    if out is None:
        raise ValueError("no 'label' output in the answer")
    if "data" in out:
        label = int(out["data"][0])
    else:
        size = int(out["parameters"]["binary_data_size"])
        if size != 8 or len(body) < n + size:
            raise ValueError(f"binary label of {size} bytes in a body of {len(body)}")
        label = int(np.frombuffer(body[n:n + size], dtype="<i8")[0])
    return doc.get("id"), label


class PredictionClient(FastHttpUser):
    """An app session: one sticky key, predictions with repeats and fresh inputs, some feedback."""

    weight = 20
    wait_time = between(*WAIT_S)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SEED}-{next(_user_numbers)}")
        self.key = f"session-{self.rng.getrandbits(48):012x}"

    def _row(self, repeat: bool) -> tuple[np.ndarray, int]:
        if repeat:
            i = int(POOL[self.rng.randrange(len(POOL))])
            return ROWS[i], int(LABELS[i])
        i = self.rng.randrange(len(ROWS))
        row = ROWS[i].copy()
        for _ in range(3):  # nudge a few pixels: a fresh input, still the same digit
            j = self.rng.randrange(row.size)
            row[j] = min(PIXEL_MAX, max(0.0, row[j] + self.rng.choice((-1.0, 1.0))))
        return row, int(LABELS[i])

    @task
    def predict(self) -> None:
        repeat = self.rng.random() < REPEAT_SHARE
        binary = self.rng.random() < BINARY_SHARE
        row, truth = self._row(repeat)
        request_id = uuid.uuid4().hex
        headers = {"x-bluegreen-key": self.key, "content-type": "application/json"}
        if binary:
            body, length = binary_body(request_id, row)
            headers = {**headers, HEADER_LENGTH: str(length), "content-type": "application/octet-stream"}
        else:
            body = json_body(request_id, row)
        name = f"infer {'binary' if binary else 'json'} {'repeat' if repeat else 'fresh'}"
        # FastHttpSession sends bytes as they are (its annotation only names str and dict).
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=headers, name=name,  # type: ignore[arg-type]
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                echoed, _ = parse_answer(resp.content or b"", resp.headers.get(HEADER_LENGTH))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                resp.failure(f"malformed answer: {exc}")
                return
            if echoed != request_id:
                resp.failure(f"the answer carries id {echoed!r}, not {request_id!r}")
                return
            resp.success()
        if not binary and self.rng.random() < FEEDBACK_SHARE:
            self._feedback(request_id, truth)

    def _feedback(self, request_id: str, label: int) -> None:
        body = orjson.dumps({"id": request_id, "label": label})
        with self.client.post(f"/feedback/v1/models/{MODEL}", data=body,  # type: ignore[arg-type]
                              headers={"content-type": "application/json"}, name="feedback",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            else:
                resp.success()


class Operator(HttpUser):
    """Watches the stats and now and then shifts the blue/green weights; only with an admin token."""

    abstract = not ADMIN_TOKEN  # locust runs no abstract user class: no token, no operator
    fixed_count = 1
    wait_time = between(*OPERATOR_WAIT_S)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SEED}-operator")
        self.auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    @task
    def watch_stats(self) -> None:
        with self.client.get(f"{ADMIN_URL}/admin/v1/models/{MODEL}/stats", headers=self.auth, name="admin stats",
                             catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    @task
    def shift_weights(self) -> None:
        split_url = f"{ADMIN_URL}/admin/v1/models/{MODEL}/split"
        with self.client.get(split_url, headers=self.auth, name="admin split get", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            weights: dict[str, Any] = resp.json()
            etag = resp.headers.get("etag")
        green = max(0, min(100, int(weights["green"]) + self.rng.choice((-20, -10, 10, 20))))
        headers = {**self.auth, **({"if-match": etag} if etag else {})}
        with self.client.put(split_url, json={"blue": 100 - green, "green": green}, headers=headers,
                             name="admin split put", catch_response=True) as resp:
            if resp.status_code == 200 or resp.status_code in EXPECTED_ADMIN_REFUSALS:
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
