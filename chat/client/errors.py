"""The client library's exceptions, one tree, mapped to exit codes at one place (cli.py).

    ClientError                    every error the client library raises
    ├── ConnectFailed              the server could not be reached: refused, unreachable,
    │                              unknown host, TCP connect timed out
    ├── TLSFailed                  TCP connected but the TLS handshake failed or timed out
    │   └── CertificateNotTrusted  the server's certificate failed verification (unknown
    │                              CA, expired, or issued for another host name)
    ├── IncompatibleServer         the server did not open with a protocol-1 `hello`
    ├── ConnectionClosed           the connection has ended; `reason` is the `bye` reason
    ├── TimedOut                   no reply (or event) within the timeout; a TimeoutError too
    └── ServerError                the server answered with an `error` frame

`ServerError` is never raised by `ChatClient.request`, which returns error frames like any
other reply; `raise_for_error(reply)` turns one into the exception when that reads better.
"""

from __future__ import annotations

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
