"""The only place TLS policy lives: the server's and the client's SSLContext.

Policy (Mozilla Server Side TLS, "intermediate" by default, "modern" on request):
- TLS 1.2 and 1.3 only ("modern": 1.3 only).
- TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only (AES-GCM, ChaCha20-Poly1305);
  every TLS 1.3 suite is already ECDHE+AEAD. No DHE, no CBC, no RSA key exchange.
- No TLS compression (CRIME), no renegotiation; the client picks among the allowed suites,
  as Mozilla recommends when every allowed suite is strong.
A context is built once and passed around; nothing else in the code sets TLS options.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# Mozilla "intermediate" TLS 1.2 suites, minus the DHE ones (the protocol allows ECDHE only).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

PROFILES = ("intermediate", "modern")


def _apply_policy(ctx: ssl.SSLContext, profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown TLS profile {profile!r}; choose one of {PROFILES}")
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if profile == "modern" else ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE


def server_context(
    certfile: str | Path,
    keyfile: str | Path,
    *,
    profile: str = "intermediate",
    client_cafile: str | Path | None = None,
) -> ssl.SSLContext:
    """A server context; with `client_cafile`, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, profile)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if client_cafile is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_cafile))
    return ctx


def client_context(
    cafile: str | Path | None = None,
    *,
    profile: str = "intermediate",
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
) -> ssl.SSLContext:
    """A verifying client context: the CA file given, else the system's trust store.

    Host-name checking and certificate verification are always on; there is deliberately
    no way to turn them off.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile and str(cafile))
    _apply_policy(ctx, profile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        ctx.load_cert_chain(str(certfile), keyfile and str(keyfile))
    return ctx
