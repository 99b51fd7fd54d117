"""The client library's exceptions, one tree, mapped to exit codes at one place (cli.py).

    ClientError                    every error the client library raises
    ├── ConnectFailed              the server could not be reached: refused, unreachable,
    │                              unknown host, TCP connect timed out
    ├── TLSFailed                  TCP connected but the TLS handshake failed or timed out
    │   ├── CertificateNotTrusted  the server's certificate failed verification (unknown
    │   │                          CA, expired, or issued for another host name)
    │   └── ClientCertificateRefused  the server wants a client certificate (mutual TLS)
    │                              and got none, or refused the one given
    ├── IncompatibleServer         the server did not open with a protocol-1 `hello`
    ├── ConnectionClosed           the connection has ended; `reason` is the `bye` reason
    ├── TimedOut                   no reply (or event) within the timeout; a TimeoutError too
    └── ServerError                the server answered with an `error` frame

`ServerError` is never raised by `ChatClient.request`, which returns error frames like any
other reply; `raise_for_error(reply)` turns one into the exception when that reads better.
"""

from __future__ import annotations

import ssl
from typing import Any

Frame = dict[str, Any]


class ClientError(Exception):
    """Base of every error the client library raises."""


class ConnectFailed(ClientError):
    """The server could not be reached (nothing was said over TLS)."""


class TLSFailed(ClientError):
    """The TCP connection was made but the TLS handshake did not complete."""


class CertificateNotTrusted(TLSFailed):
    """The server's certificate did not verify against the trusted CAs or the host name."""

    def __init__(self, message: str, *, verify_message: str = "") -> None:
        super().__init__(message)
        # OpenSSL's own words ("self-signed certificate in certificate chain", "Hostname
        # mismatch, ..."), kept apart so the CLI can phrase its advice around them.
        self.verify_message = verify_message


class ClientCertificateRefused(TLSFailed):
    """The server requires a client certificate (mutual TLS): none was given, or it refused it."""

    def __init__(self, message: str, *, alert: str, missing: bool) -> None:
        super().__init__(message)
        self.alert = alert  # OpenSSL's name for the server's alert
        self.missing = missing  # True: the server said a certificate is required


# The server's TLS alerts that are about the client's certificate. With TLS 1.3 they come
# after our side of the handshake is complete, on the first read.
_CERTIFICATE_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
_CERTIFICATE_REFUSED = frozenset({
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
    "TLSV1_ALERT_DECRYPT_ERROR",
})


def certificate_refusal(
    failure: BaseException | None, peer: str
) -> ClientCertificateRefused | None:
    """The error for a TLS failure that was the server refusing our certificate, else None."""
    alert = failure.reason if isinstance(failure, ssl.SSLError) else None
    if alert == _CERTIFICATE_REQUIRED:
        return ClientCertificateRefused(
            f"the server at {peer} requires a client certificate (mutual TLS) "
            "and none was given",
            alert=alert, missing=True,
        )
    if alert in _CERTIFICATE_REFUSED:
        return ClientCertificateRefused(
            f"the server at {peer} refused the client certificate ({alert}): it must be "
            "issued by a CA the server trusts, valid today, and meant for client "
            "authentication",
            alert=alert, missing=False,
        )
    return None


class EncryptionUnavailable(ClientError):
    """End-to-end encryption is on but this device's key store cannot be used (a wrong
    passphrase, a key file that is not its own, a directory others may read). The
    session is not carried on without it: a direct message would go out in clear."""


class IncompatibleServer(ClientError):
    """The peer speaks TLS but did not greet us with a protocol-1 `hello`."""


class ConnectionClosed(ClientError):
    """The connection has ended; nothing more can be sent or received on it."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # the `bye` frame's reason, when the server said one


class TimedOut(ClientError, TimeoutError):
    """Nothing arrived within the timeout; the connection itself may still be fine."""


class ServerError(ClientError):
    """An `error` frame from the server, as an exception."""

    def __init__(
        self,
        code: str,
        message: str,
        retry_after: float | None = None,
        frame: Frame | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.frame = frame

    @classmethod
    def from_frame(cls, frame: Frame) -> ServerError:
        retry_after = frame.get("retry_after")
        return cls(
            str(frame.get("code", "unknown")),
            str(frame.get("message", "")),
            retry_after if isinstance(retry_after, int | float) else None,
            frame,
        )


def raise_for_error(reply: Frame) -> Frame:
    """Return `reply` unchanged, or raise ServerError if it is an `error` frame."""
    if reply.get("type") == "error":
        raise ServerError.from_frame(reply)
    return reply
