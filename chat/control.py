"""The operator's control socket: a Unix socket in the data directory, for `chat-admin`.

Who may use it is decided by the file system and checked again by the kernel: the socket
is made with mode 0600 in a directory no other user may write (the server refuses to
make it anywhere another could replace it), and each connection's peer must run as
the server's user (SO_PEERCRED). Root may too.

One request per connection: a JSON line `{"action": NAME, "args": {...}}`, answered with
one line, `{"ok": true, "result": {...}}` or `{"ok": false, "error": TEXT}`. Each action
(chat.admin_actions) runs as a job of the store's writer, so it is ordered with every message
and moderation step, and its continuation tells live sessions after the COMMIT; the
reply is sent once that is done.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat.admin_actions import ACTIONS, Ops, Refused
from chat.config import SettingError
from chat.errors import ChatError
from chat.store import Job, Store

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024
# Requests handled at once; an operator's scripts need few, and each holds a thread.
MAX_CONCURRENT = 8
# A stuck chat-admin must not hold a thread for long; the writer answers in milliseconds.
TIMEOUT = 30.0


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


# sockaddr_un holds 108 bytes with the final NUL.
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SettingError("data_dir", f"the control socket's path {path} is longer than the "
                           f"{MAX_SOCKET_PATH} bytes a Unix socket may have: choose a shorter "
                           "data_dir", exit_code=2)


def check_private(directory: Path) -> None:
    """Refuse a directory another user owns or may write: they could replace the socket.
    (Reaching it needs write permission on the socket itself, which is 0600.)"""
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SettingError("data_dir", f"the control socket's directory {directory} must "
                           f"belong to this user and be writable by no one else (chmod 700 "
                           f"{directory}); it is mode {stat.S_IMODE(st.st_mode):04o}",
                           exit_code=1)


class ControlServer:
    def __init__(self, path: Path, store: Store, hub: Any, pepper_id: str | None = None
                 ) -> None:
        self.path = path
        self.store = store
        self.hub = hub
        self.pepper_id = pepper_id
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._stopping = False
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    def start(self) -> None:
        check_private(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise SettingError("data_dir", f"another server is using the control socket "
                                   f"{self.path} (the same data_dir)", exit_code=1)
            self.path.unlink()  # left behind by a server that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                with conn, contextlib.suppress(OSError):
                    _reply(conn, {"ok": False, "error": "busy: too many chat-admin requests "
                                  "at once; try again"})
                continue
            threading.Thread(target=self._handle_in_slot, args=(conn,), name="control-conn",
                             daemon=True).start()

    def _handle_in_slot(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                if not _same_user(conn):
                    _reply(conn, {"ok": False, "error": "not the server's user"})
                    return
                request = _read_line(conn)
                _reply(conn, self.perform(request))
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    _reply(conn, {"ok": False, "error": f"bad request: {exc}"})
            except Exception:
                log.exception("control: a request failed")
                with contextlib.suppress(OSError):
                    _reply(conn, {"ok": False, "error": "internal error (see the server's log)"})

    def perform(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one action on the writer and wait for it (and its continuation)."""
        name, args = request.get("action"), request.get("args", {})
        action = ACTIONS.get(name) if isinstance(name, str) else None
        if action is None:
            return {"ok": False, "error": f"unknown action {str(name)[:40]!r}"}
        problem = bad_arguments(action, args)
        if problem:
            return {"ok": False, "error": f"{name}: {problem}"}
        done = threading.Event()
        answer: dict[str, Any] = {}

        def run(db: Any) -> Callable[[], None]:
            ops = Ops(db, self.store, self.hub, self.pepper_id)
            try:
                result = action(ops, **args)
            except Refused as exc:
                raise _Refusal(str(exc)) from None
            except TypeError as exc:
                raise _Refusal(f"bad arguments: {exc}") from None

            def after() -> None:
                try:
                    ops.run_later()
                    answer.update(ok=True, result=result)
                finally:
                    answer.setdefault("ok", False)
                    answer.setdefault("error", "done, but telling the sessions failed "
                                               "(see the server's log)")
                    # Over a cluster: once every node has applied it (ended sessions,
                    # removed members), as the operator expects when the command returns.
                    self.hub.sync(done.set)

            return after

        def fail(exc: ChatError) -> None:
            answer.update(ok=False, error=exc.message)
            done.set()

        self.store.submit(Job(run, fail))
        if not done.wait(TIMEOUT):
            return {"ok": False, "error": f"the server did not answer within {TIMEOUT:g} s; "
                    "the action may still be carried out (chat-admin audit will say)"}
        return answer


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "str | None": (str, type(None)),
    "int | None": (int, type(None)),
}


def bad_arguments(action: Callable[..., Any], args: Any) -> str | None:
    """What is wrong with `args` for `action` (its parameters and their annotated types)."""
    if not isinstance(args, dict):
        return "args must be an object"
    params = list(inspect.signature(action).parameters.values())[1:]  # after `ops`
    known = {p.name: p for p in params}
    for key, value in args.items():
        param = known.get(key)
        if param is None:
            return f"unknown argument {str(key)[:40]!r}"
        types = _TYPES.get(str(param.annotation))
        if types is None or isinstance(value, bool) or not isinstance(value, types):
            return f"{key} must be {param.annotation}"
    missing = [p.name for p in params if p.default is p.empty and p.name not in args]
    return f"missing {', '.join(missing)}" if missing else None


class _Refusal(ChatError):
    code = "refused"


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def _read_line(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("a JSON object is required")
    return request


def _reply(conn: socket.socket, frame: dict[str, Any]) -> None:
    conn.sendall(json.dumps(frame).encode() + b"\n")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def call(path: Path, action: str, args: dict[str, Any], timeout: float = TIMEOUT
         ) -> dict[str, Any]:
    """chat-admin's side: one request, one answer. OSError if nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"action": action, "args": args}).encode() + b"\n")
        return _read_line(sock)
