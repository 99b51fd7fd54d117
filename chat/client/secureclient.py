"""A ChatClient that encrypts and decrypts by itself: what `chat-client` runs on.

`SecureClient` is a ChatClient whose `request` hands messages, history and the
end-to-end commands to a `Secure` layer (chat.client.secure), and whose events come out
of `Secure.process`: decrypted messages with their `e2e` field, and `e2e` news. So the
CLI's commands, printer and reconnection work unchanged on it:

- a `login` that succeeds on a server offering "e2e" opens the key store (through
  `opener`, once per process) and binds this connection to the device (`attach`); the
  same happens on each reconnection, which logs in through `request` too;
- `send` with a `message` is encrypted when the room is encrypted, or the direct
  message's peer has a device (see Secure.say and Secure.direct);
- `create` with `"encrypted":true`, `history`, `kick` and `ban` go through the layer;
- requests of the local types below are answered here, never sent: their reply is put
  on the event queue like a server's (with `re`), so the CLI shows it in its place:

    {"type":"e2e_fingerprint"}
    {"type":"e2e_devices","username":U}
    {"type":"e2e_verify","username":U,"device":D|None}
    {"type":"e2e_verify","action":"confirm"|"cancel"}

If the key store cannot be opened, the session goes on without end-to-end encryption and
says so once (an `e2e` warning): encrypted messages then show as `[encrypted]`.

Threads: as for ChatClient; the layer serialises its own state (see chat.client.secure).
`_ready` is read by the one thread reading events.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.crypto import ROTATE_AFTER_MESSAGES, ROTATE_AFTER_SECONDS
from chat.client.e2e_results import E2EError
from chat.client.errors import ClientError, EncryptionUnavailable, Frame
from chat.client.keystore import KeyStoreError
from chat.client.secure import Secure, notice
from chat.client.transport import where

LOCAL_TYPES = frozenset({"e2e_fingerprint", "e2e_devices", "e2e_verify"})


class SecureClient(ChatClient):
    """A ChatClient with end-to-end encryption (see the module's docstring)."""

    # Set by the caller after `connect` (else the default: a key store per server and
    # user under the XDG data directory): makes (or returns the one) Secure for a user.
    opener: Callable[[str], Secure] | None = None
    # False: no end-to-end encryption at all (chat-client --no-e2e).
    encrypt: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secure: Secure | None = None
        self._ready: deque[Frame] = deque()
        self.server_name: str | None = None  # "host:port", which names the key store
        # Set while the layer itself makes a request through us: it goes to the wire as
        # given (the layer's own `say` of a plaintext room must not come back to it).
        self._raw = threading.local()

    @contextmanager
    def raw(self) -> Iterator[None]:
        """Requests made inside go out as plain ChatClient requests (this thread only)."""
        depth = getattr(self._raw, "depth", 0)
        self._raw.depth = depth + 1
        try:
            yield
        finally:
            self._raw.depth = depth

    @classmethod
    def connect(cls, host: str, port: int, **kwargs: Any) -> SecureClient:  # type: ignore[override]
        client = super().connect(host, port, **kwargs)
        assert isinstance(client, SecureClient)
        client.server_name = where(host, port)
        return client

    # -- requests ---------------------------------------------------------------------

    def request(self, frame: Frame, timeout: float = DEFAULT_TIMEOUT, *,
                quiet: bool = False) -> Frame:
        kind = frame.get("type")
        if getattr(self._raw, "depth", 0):
            return super().request(frame, timeout, quiet=quiet)
        if kind in LOCAL_TYPES:
            return self._local(frame)
        secure = self.secure
        if kind == "login":
            reply = super().request(frame, timeout, quiet=quiet)
            if reply.get("type") == "welcome":
                self._start_e2e(str(reply.get("username", frame.get("username"))))
            return reply
        if secure is None or secure.client is not self:
            return super().request(frame, timeout, quiet=quiet)
        if kind == "send" and isinstance(frame.get("message"), str):
            try:
                if isinstance(frame.get("room"), str):
                    return secure.say(frame["room"], frame["message"], timeout)
                if isinstance(frame.get("to"), str):
                    return secure.direct(frame["to"], frame["message"], timeout)
            except E2EError as e:  # nothing was sent: said like a server's refusal
                return self._reply({"type": "error", "code": "e2e", "message": str(e)})
        reply = super().request(frame, timeout, quiet=quiet)
        if kind == "history":
            return secure.decrypt_history(reply)
        if kind in ("kick", "ban") and isinstance(frame.get("room"), str):
            secure.removed_member(frame["room"], reply)
        secure.process_reply(reply)
        return reply

    def _start_e2e(self, username: str) -> None:
        if not self.encrypt or not Secure.supported(self):
            return
        if self.opener is None:
            self.opener = e2e_opener(self.server_name or "unknown")
        try:
            secure = self.opener(username)
            secure.notify = self._tell
            news = secure.attach(self)
        except (KeyStoreError, E2EError, OSError) as e:
            # Failing closed: carrying on would send direct messages in clear, even in
            # conversations that were encrypted until now.
            raise EncryptionUnavailable(f"end-to-end encryption cannot start: {e}") from e
        self.secure = secure
        for frame in news:
            self._tell(frame)

    def _tell(self, frame: Frame) -> None:
        """Show a frame of ours among the server's, in order (the reader wakes up)."""
        self._events.put(frame)

    def _local(self, frame: Frame) -> Frame:
        try:
            reply = self._answer(frame)
        except (E2EError, ClientError) as e:
            reply = {"type": "error", "code": "e2e", "message": str(e)}
        return self._reply(reply)

    def _reply(self, reply: Frame) -> Frame:
        """A reply made here, with an id of its own, shown among the events where replies
        are (the CLI waits until it has shown the reply to what it asked)."""
        with self._lock:
            reply["re"] = next(self._ids)
        if self.replies_are_events:
            self._tell(reply)
        return reply

    def _answer(self, frame: Frame) -> Frame:
        secure = self.secure
        if secure is None or secure.client is not self:
            raise E2EError("end-to-end encryption is not on in this session")
        kind = frame["type"]
        if kind == "e2e_fingerprint":
            return notice("fingerprint", f"this device {secure.device}: "
                          f"{secure.fingerprint()}", device=secure.device)
        if kind == "e2e_devices":
            user = str(frame.get("username"))
            devices = secure.devices(user)
            lines = [f"{user}'s devices:" if devices else f"{user} has no devices"]
            for d in devices:
                state = "verified" if d.verified else "not verified"
                if d.state != "ok":
                    state += f", {d.state}"
                mine = " (this device)" if (d.username, d.device) == (
                    secure.user, secure.device) else ""
                lines.append(f"  {d.device}{mine}: {_group(d.ed25519)} [{state}]")
            return notice("devices", "\n".join(lines), username=user)
        action = frame.get("action")
        if action in ("confirm", "cancel"):
            txn = secure.current_verification()
            if txn is None:
                raise E2EError("no verification in progress")
            if action == "cancel":
                secure.cancel_verification(txn)
                return notice("sas_cancelled", "verification cancelled")
            for news in secure.confirm_verification(txn):
                self._tell(news)
            return notice("sas_confirmed", "confirmed; waiting for the other device")
        user = str(frame.get("username"))
        txn = secure.start_verification(user, frame.get("device"))
        target = secure.verifications().get(txn)
        who = f"{target[0]}/{target[1]}" if target else user
        return notice("sas_requested", f"verification of {who} started: the codes show when "
                      "that device answers (if it is offline, when it next connects)",
                      txn=txn)

    # -- events -----------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Frame:
        while not self._ready:
            frame = super().next_event(timeout)
            secure = self.secure
            if secure is None:
                return frame
            self._ready.extend(secure.process(frame))
        return self._ready.popleft()

    def pending_events(self) -> list[Frame]:
        frames = list(self._ready)
        self._ready.clear()
        for frame in super().pending_events():
            frames.extend(self.secure.process(frame) if self.secure else [frame])
        return frames


def e2e_opener(server: str, environ: Mapping[str, str] = os.environ, *,
               passphrase: str | None = None, verified_only: bool = False,
               rotate_messages: int = ROTATE_AFTER_MESSAGES,
               rotate_seconds: float = ROTATE_AFTER_SECONDS) -> Callable[[str], Secure]:
    """An opener for SecureClient: one Secure per user for the life of the process (a
    reconnection keeps its device), its store under the user's data directory, made if
    missing (as the XDG spec says: a fresh account may have no ~/.local/share yet, and
    encryption must not be off for that). With `passphrase`, the store's key is derived
    from it instead of kept in a key file; `verified_only` and the rotation bounds are
    the client's settings of the same names (docs/e2e.md)."""
    opened: dict[str, Secure] = {}

    def open_secure(username: str) -> Secure:
        if username.lower() not in opened:
            opened[username.lower()] = Secure.open(
                server, username, environ, passphrase=passphrase,
                verified_only=verified_only, rotate_messages=rotate_messages,
                rotate_seconds=rotate_seconds)
        return opened[username.lower()]

    return open_secure


def _group(key: str) -> str:
    return " ".join(key[i:i + 4] for i in range(0, len(key), 4))
