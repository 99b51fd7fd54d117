"""The only place TLS policy lives: the server's and the client's SSLContext.

Policy (Mozilla Server Side TLS, "intermediate" by default, "modern" on request):
- TLS 1.2 and 1.3 only ("modern": 1.3 only).
- TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only (AES-GCM, ChaCha20-Poly1305);
  every TLS 1.3 suite is already ECDHE+AEAD. No DHE, no CBC, no RSA key exchange.
- Key exchange groups X25519, P-256 and P-384 only (OpenSSL would also offer X448 and
  P-521, which Mozilla's profiles leave out).
- No TLS compression (CRIME), no renegotiation; the client picks among the allowed suites,
  as Mozilla recommends when every allowed suite is strong.

Python's default server context fails both Mozilla profiles (it allows TLS 1.0 ciphers'
successors such as CBC suites in 1.2 and every group OpenSSL knows); `_apply_policy`
fixes each point. Python 3.11's `ssl` has no call for the group list, so `_set_groups`
calls OpenSSL's own SSL_CTX_set1_groups_list through ctypes, on the very library that
`ssl` loaded, after checking it has the right SSL_CTX; if anything about that does not
hold, it falls back to the one-curve call that `ssl` does have (P-256).
A context is built once and passed around; nothing else in the code sets TLS options.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from pathlib import Path

log = logging.getLogger(__name__)

GROUPS = b"X25519:P-256:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is this SSL_CTX_ctrl command

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
    _set_groups(ctx)


def _libssl() -> ctypes.CDLL | None:
    # The libssl that the _ssl extension loaded: dlopen of the same path returns it.
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libssl.so" in path:
                    lib = ctypes.CDLL(path)
                    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
                    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
                    lib.SSL_CTX_ctrl.restype = ctypes.c_long
                    lib.SSL_CTX_ctrl.argtypes = [
                        ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
                    ]
                    return lib
    except (OSError, AttributeError):
        pass
    return None


def _set_groups(ctx: ssl.SSLContext) -> bool:
    """Limit key exchange to GROUPS; True if done exactly, False if fell back to P-256."""
    lib = _libssl() if (3, 8) <= sys.version_info < (3, 15) else None
    if lib is not None:
        # CPython's SSLContext object starts with its SSL_CTX pointer, right after the
        # object header. Confirm it by reading the options back before changing anything.
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        same = ptr and lib.SSL_CTX_get_options(ptr) == int(ctx.options)
        if same and lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS) == 1:
            return True
    log.warning("cannot set the TLS group list here; using P-256 only")
    ctx.set_ecdh_curve("prime256v1")
    return False


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
