"""One TLS connection driven by one I/O thread: bytes out from any thread, bytes in to a callback.

Theory of operation
-------------------
OpenSSL forbids two threads to use one SSL object at once, so after the (blocking)
handshake in `open_tls`, exactly one thread, the I/O thread that `Transport.start` starts,
ever touches the socket. It runs a `selectors` loop over the non-blocking TLS socket and the
read end of a wake-up socketpair.

- Sending: any thread calls `send(data)`, which appends the bytes to `_outbox` and writes a
  byte to the wake-up socket. The I/O thread moves queued bytes into `_sending` and writes
  them; after SSLWantRead/WriteError it retries with the very same bytes, as OpenSSL
  requires, and takes new bytes only once those are gone.
- Receiving: the I/O thread reads what is there, then drains `pending()` (bytes OpenSSL has
  decrypted already are invisible to select) and hands each chunk to `on_data`, in order.
- Ending: when the peer closes, the socket fails or `close()` is called, the I/O thread
  marks the transport closed (later `send`s raise ConnectionClosed), keeps the error that
  ended it in `failure` (a TLS alert, say), closes the sockets and calls `on_close` once.
  Both callbacks run in the I/O thread and must not block.

`_lock` guards `_closed` and the wake-up socket's life, so no thread writes to that socket
once it is closed; it is never held while blocking.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

from chat.client.errors import (
    CertificateNotTrusted,
    ConnectFailed,
    ConnectionClosed,
    TLSFailed,
    certificate_refusal,
)

READ_CHUNK = 65536  # bytes per recv; one TLS record is at most 16 KiB
WRITE_BATCH = 65536  # queued sends are joined up to this size before one write
DEFAULT_PORT = 7072  # the protocol's default port, named in the advice below

# OpenSSL's reasons for a peer whose first bytes are not a TLS record: a plain-HTTP server's
# answer, an SSH banner, a text protocol (the names differ between OpenSSL versions).
_NOT_TLS = frozenset({
    "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "UNEXPECTED_RECORD",
})


def open_tls(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    timeout: float,
) -> ssl.SSLSocket:
    """Connect and complete the TLS handshake (blocking, each step within `timeout`).

    Raises ConnectFailed if the server cannot be reached, CertificateNotTrusted if its
    certificate does not verify, ClientCertificateRefused if it wants a client
    certificate, TLSFailed if the handshake fails otherwise; each message says what the
    failure usually means.
    """
    deadline = time.monotonic() + timeout
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {where(host, port)}: {_why(exc)}") from exc
    tls: ssl.SSLSocket | None = None
    try:
        tls = ssl_context.wrap_socket(
            raw, server_hostname=server_hostname or host, do_handshake_on_connect=False
        )
        tls.settimeout(remaining(deadline))
        tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        (tls or raw).close()
        verify = exc.verify_message or exc.reason or str(exc)
        raise CertificateNotTrusted(
            f"the certificate of {where(host, port)} is not trusted: {verify}",
            verify_message=verify,
        ) from exc
    except OSError as exc:  # SSLError, a reset or a timeout during the handshake
        (tls or raw).close()
        raise handshake_failure(exc, where(host, port), timeout) from exc
    tls.setblocking(False)
    return tls


def handshake_failure(exc: OSError, peer: str, timeout: float) -> TLSFailed:
    """The error for a failed TLS handshake with `peer`, saying what it usually means."""
    refusal = certificate_refusal(exc, peer)
    if refusal is not None:
        return refusal
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason in _NOT_TLS:
        return TLSFailed(
            f"the server at {peer} does not speak TLS ({reason}): is it a chat server? "
            f"The chat port is {DEFAULT_PORT}."
        )
    if isinstance(exc, TimeoutError):
        return TLSFailed(
            f"the TLS handshake with {peer} timed out after {timeout:g} s: something "
            "accepted the connection but never answered. That usually means it is not a "
            f"chat server (the chat port is {DEFAULT_PORT}), or a firewall or proxy is in "
            "between, or the server is too busy to answer."
        )
    if isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return TLSFailed(
            f"{peer} closed the connection during the TLS handshake ({_why(exc)}): a chat "
            "server at its connection limit does that, and so does a balancer with no node "
            f"to send you to; otherwise it may not be a chat server (the chat port is "
            f"{DEFAULT_PORT})"
        )
    return TLSFailed(f"TLS handshake with {peer} failed: {_why(exc)}")


def certificate_names(
    host: str, port: int, ssl_context: ssl.SSLContext, *, timeout: float
) -> list[str]:
    """The DNS and IP subjectAltNames of the certificate the server at host:port presents.

    Only for telling the user which names a certificate that failed the host-name check was
    issued for: `ssl_context` must verify the chain (CERT_REQUIRED); only its host-name
    check may be off. The connection is closed right after the handshake, nothing is sent
    on it. Any failure gives [].
    """
    if ssl_context.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("certificate_names needs a context that verifies the chain")
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ssl_context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            cert = tls.getpeercert() or {}
    except (OSError, ValueError):
        return []
    names = cert.get("subjectAltName", ())
    return [str(value) for kind, value in names if kind in ("DNS", "IP Address")]


class Transport:
    """Owns a non-blocking TLS socket and the one thread allowed to use it."""

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        on_data: Callable[[bytes], None],
        on_close: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._on_data = on_data
        self._on_close = on_close
        self._outbox: deque[bytes] = deque()  # append/popleft are atomic: no lock needed
        self._sending = b""  # I/O thread only: bytes being written, retried unchanged
        self._write_wants_read = False  # I/O thread only
        self._read_wants_write = False  # I/O thread only
        self._lock = threading.Lock()
        self._closed = False
        self._closing = False
        self.failure: OSError | None = None  # what ended the I/O thread, if not a plain close
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="chat-client-io", daemon=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._thread.start()

    def send(self, data: bytes) -> None:
        """Queue bytes for the I/O thread to write; ConnectionClosed once closed."""
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the connection is closed")
            self._outbox.append(data)
            self._wake()

    def close(self) -> None:
        """Ask the I/O thread to stop at once (queued bytes may be dropped)."""
        self._closing = True
        with self._lock:
            if not self._closed:
                self._wake()

    def join(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the I/O thread to end."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _wake(self) -> None:
        # Callers hold _lock and have checked _closed, so the socket is still open.
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full: a wake-up is already pending

    # -- the I/O thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except OSError as exc:  # the connection failed: kept, for telling the user why
            self.failure = exc
        finally:
            with self._lock:
                self._closed = True
                self._wake_w.close()
            self._sock.close()
            self._wake_r.close()
            self._on_close()

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            mask = selectors.EVENT_READ
            sel.register(self._sock, mask)
            while not self._closing:
                self._take_outgoing()
                wanted = selectors.EVENT_READ
                if (self._sending and not self._write_wants_read) or self._read_wants_write:
                    wanted |= selectors.EVENT_WRITE
                if wanted != mask:
                    sel.modify(self._sock, wanted)
                    mask = wanted
                sel.select()
                self._drain_wake()
                if self._closing or not self._read():
                    return
                self._take_outgoing()  # bytes queued by on_data or by other threads meanwhile
                self._write()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _read(self) -> bool:
        """Read and hand on whatever is available; False once the peer has closed."""
        self._read_wants_write = False
        while True:
            try:
                data = self._sock.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                return True
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
                return False
            if not data:
                return False
            self._on_data(data)
            if not self._sock.pending():
                return True

    def _take_outgoing(self) -> None:
        if self._sending or not self._outbox:
            return
        parts: list[bytes] = []
        size = 0
        while self._outbox and size < WRITE_BATCH:
            part = self._outbox.popleft()
            parts.append(part)
            size += len(part)
        self._sending = b"".join(parts)

    def _write(self) -> None:
        self._write_wants_read = False
        while self._sending:
            try:
                sent = self._sock.send(self._sending)
            except ssl.SSLWantWriteError:
                return  # retried with the same bytes once the socket is writable
            except ssl.SSLWantReadError:
                self._write_wants_read = True
                return
            self._sending = self._sending[sent:]
            self._take_outgoing()


def remaining(deadline: float) -> float:
    # Never 0: a zero timeout would make a socket non-blocking instead of failing fast.
    return max(0.001, deadline - time.monotonic())


def where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
