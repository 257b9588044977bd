"""What the gateway needs to check requests exactly as the model server does, before any backend is called.

The check itself is :func:`serving.protocol.check_request`, the model server's own. This module supplies its
inputs: a model's :class:`~serving.protocol.Signature` carrying the model's limits (``max_batch_size``,
``allow_non_finite``), learned from a backend's V2 metadata and Triton-style ``/config`` and tightened by the
routing file; and :func:`parse_and_check_off_loop`, which parses and checks a large body on a worker thread, so
that one big request never holds the event loop for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.settings import ModelRoute
from serving import protocol
from serving.protocol import CheckedRequest, Signature, TensorSpec

GetJson = Callable[[str, float], Awaitable[object | None]]

#: JSON bodies above this are checked on a worker thread: the check is O(n) in C (a type pass, one numpy
#: conversion, one BLAS reduction per input), ~25 ms per MB of FP32 JSON on this machine; below it the hop
#: to a thread (~50 µs) costs more than it saves.
OFF_LOOP_BYTES = 256 * 1024


def signature_from_docs(metadata: object, config: object, route: ModelRoute | None) -> Signature | None:
    """A signature from V2 model metadata, with limits from a Triton-style config (may be None: an older
    server) and the routing file (which wins where it is stricter). None when the metadata is unusable."""
    if not isinstance(metadata, dict):
        return None
    try:
        ins = tuple(TensorSpec(i["name"], i["datatype"], tuple(int(d) for d in i["shape"]))
                    for i in metadata["inputs"])
        outs = tuple(TensorSpec(o["name"], o["datatype"], tuple(int(d) for d in o["shape"]))
                     for o in metadata["outputs"])
    except (KeyError, TypeError, ValueError):
        return None
    max_rows, non_finite = _config_limits(config)
    if route is not None and route.max_batch_size is not None:
        max_rows = route.max_batch_size if max_rows is None else min(max_rows, route.max_batch_size)
    if route is not None and route.allow_non_finite is not None:
        non_finite = route.allow_non_finite
    return Signature(ins, outs, max_batch_size=max_rows, allow_non_finite=bool(non_finite))


def _config_limits(config: object) -> tuple[int | None, bool | None]:
    if not isinstance(config, dict):
        return None, None
    rows = config.get("max_batch_size")
    max_rows = rows if type(rows) is int and rows > 0 else None  # Triton: 0 means "no batch dimension"
    params = config.get("parameters")
    non_finite: bool | None = None
    if isinstance(params, dict):
        entry = params.get("allow_non_finite")
        if isinstance(entry, dict) and isinstance(entry.get("string_value"), str):
            non_finite = entry["string_value"].lower() == "true"
    return max_rows, non_finite


async def learn_signature(get_json: GetJson, url: str, name: str, version: str,
                          route: ModelRoute | None, timeout_s: float = 1.0) -> Signature | None:
    """Ask one backend for a model version's metadata and config; None when it does not answer usably."""
    base = f"{url}/v2/models/{name}/versions/{version}"
    metadata = await get_json(base, timeout_s)
    if metadata is None:
        return None
    config = await get_json(f"{base}/config", timeout_s)
    return signature_from_docs(metadata, config, route)


async def parse_and_check_off_loop(body: bytes, header_length: str | None, signature: Signature | None
                                   ) -> tuple[dict[str, Any], CheckedRequest | None]:
    """Parse a big body and check it against the model on a worker thread (what the request path does with a
    body its skeleton read cannot take: nested or non-numeric arrays, binary tensors); the parsed header, and
    the check's result when the model is known."""
    return await asyncio.to_thread(_parse_and_check, body, header_length, signature)


def _parse_and_check(body: bytes, header_length: str | None, signature: Signature | None
                     ) -> tuple[dict[str, Any], CheckedRequest | None]:
    header, binary = protocol.split_body(body, header_length)
    return header, None if signature is None else protocol.check_request(header, binary, signature)
