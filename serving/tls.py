"""TLS contexts for our listeners (gateway and model server) and for their clients (gateway to backends).

Server side: TLS 1.2 at least (``1.3`` where a deployment asks for it), the certificate chain and key from files,
ALPN ``http/1.1`` (the servers speak HTTP/1.1 only), and — for mutual TLS — client certificates required and
verified against a CA file. Python's defaults do the rest (OpenSSL's cipher list without the weak suites, no
compression, no renegotiation). Client side: the system's trust store, or a CA file for a private PKI, with the
host name checked.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

MinVersion = Literal["1.2", "1.3"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cert_file: Path, key_file: Path, min_version: MinVersion = "1.2",
                   client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A listener's context; with ``client_ca_file``, a client without a certificate that CA signed is refused
    in the handshake, before any request is read."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=client_ca_file)
    return ctx


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """For ``https://`` backends: verified against ``ca_file`` when given, else the system's trust store."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
