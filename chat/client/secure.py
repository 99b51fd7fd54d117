"""End-to-end encryption for a ChatClient: the glue between the wire and the E2E machine.

    secure = Secure.open(f"{host}:{port}", "alice")         # the device's key store
    client = ChatClient.connect(host, port, ssl_context=ctx)
    client.login("alice", password)
    if Secure.supported(client):
        secure.attach(client)                                  # bind, keys, outbox
    secure.say("secret", "hello")                              # encrypted if the room is
    for frame in secure.events(client.events()):               # decrypted, with "e2e"
        ...

What a caller sees
------------------
`process(frame)` turns one frame from the server into what to show: a `message` with
`encrypted` comes back with its plaintext as `message` and an `e2e` field,
`{"status":"ok","verified":B}`, `{"status":"pending","reason":R}` or
`{"status":"refused","reason":R}` (never to be shown as the sender's words); a plaintext
direct message gets `{"status":"plaintext"}`. A `history` reply's messages are treated
the same way. The frames of the machinery (`to_device`, `key_count`, `device_list`) are
handled here and become, where there is news, frames of type `e2e` with a `kind`
(`new_device`, `changed_key`, `removed`, `bad_signature`, `warning`, `sas_started`,
`sas_codes`, `verified`, `sas_cancelled`, `keys_forwarded`), a `loud` flag and a
`text`. A message that was pending comes again, decrypted, once its key arrives (with
`"late":true` in its `e2e`). Nothing is dropped silently. Everything else passes through.
News made outside `process` (by a send, or by `devices`) goes to `notify` if set (the
SecureClient puts it on its event queue), else waits for `notices()` or the next
`process`.

`say`, `direct`, `create`, `kick`, `ban` and `history` stand in for the ChatClient's
methods of those names; the others are used on the ChatClient directly.

Theory of operation
-------------------
The E2E machine and its SQLite store are not thread-safe; every use of them here holds
`_lock` (a re-entrant lock), so the thread reading events (the CLI's printer) and the
thread sending (its prompt) take turns. Requests made while holding it (`query_keys`,
`claim_key`, `to_device`, `members`) are answered through the ChatClient's waiters, never
through its event queue, so holding the lock while waiting cannot deadlock the reader.

Durability follows docs/e2e.md: a to-device frame is acknowledged only after the machine
committed what it changed; every `to_device` request the machine makes waits in its
outbox and is sent from there (byte for byte, with its `send_id`) before the message it
carries keys for, and again after a reconnect (`attach`) if its answer was lost.

Keys of other users are asked for (`query_keys`) once per connection before we first
encrypt for them, and again when a `device_list` notice says their devices changed. A
room's members come from the server at each send; the current Megolm session is replaced
when someone who had it is no longer a member (as well as on a `presence` leave, a kick or
a ban), so that a removed member cannot read what follows.
"""

from __future__ import annotations

import os
import secrets
import string
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.conversations import dm_conversation, room_conversation
from chat.client.crypto import E2E, ROTATE_AFTER_MESSAGES, ROTATE_AFTER_SECONDS
from chat.client.e2e_results import Decrypted, E2EError, Refused, Status, Target, ToDeviceResult
from chat.client.errors import ClientError, ConnectionClosed, Frame
from chat.client.keystore import Device, KeyStore
from chat.client.sas import SasError
from chat.messages import MAX_QUERIED_USERS

FEATURE = "e2e"
# A device id is chosen once per key store and kept in it: 10 of A-Z a-z 0-9 give
# 59 bits, plenty to keep one user's (at most 20) devices apart.
DEVICE_ID_CHARS = 10
# Top up the server's one-time keys when a key_count says fewer than this many are left
# (the machine refills to its target, 50): half the stock leaves room for a burst of
# claims between two notices.
KEY_COUNT_LOW = 25

# The SAS emoji table (as Matrix has it): `Codes.emoji` are indices into it.
SAS_EMOJI = (
    ("🐶", "dog"), ("🐱", "cat"), ("🦁", "lion"), ("🐎", "horse"), ("🦄", "unicorn"),
    ("🐷", "pig"), ("🐘", "elephant"), ("🐰", "rabbit"), ("🐼", "panda"), ("🐓", "rooster"),
    ("🐧", "penguin"), ("🐢", "turtle"), ("🐟", "fish"), ("🐙", "octopus"),
    ("🦋", "butterfly"), ("🌷", "flower"), ("🌳", "tree"), ("🌵", "cactus"),
    ("🍄", "mushroom"), ("🌏", "globe"), ("🌙", "moon"), ("☁️", "cloud"), ("🔥", "fire"),
    ("🍌", "banana"), ("🍎", "apple"), ("🍓", "strawberry"), ("🌽", "corn"), ("🍕", "pizza"),
    ("🎂", "cake"), ("❤️", "heart"), ("😀", "smiley"), ("🤖", "robot"), ("🎩", "hat"),
    ("👓", "glasses"), ("🔧", "spanner"), ("🎅", "santa"), ("👍", "thumbs up"),
    ("☂️", "umbrella"), ("⌛", "hourglass"), ("⏰", "clock"), ("🎁", "gift"),
    ("💡", "light bulb"), ("📕", "book"), ("✏️", "pencil"), ("📎", "paperclip"),
    ("✂️", "scissors"), ("🔒", "lock"), ("🔑", "key"), ("🔨", "hammer"), ("☎️", "telephone"),
    ("🏁", "flag"), ("🚂", "train"), ("🚲", "bicycle"), ("✈️", "aeroplane"), ("🚀", "rocket"),
    ("🏆", "trophy"), ("⚽", "ball"), ("🎸", "guitar"), ("🎺", "trumpet"), ("🔔", "bell"),
    ("⚓", "anchor"), ("🎧", "headphones"), ("📁", "folder"), ("📌", "pin"),
)


class SecureError(E2EError):
    """Something asked of the encryption layer cannot be done (no such device, ...)."""


def notice(kind: str, text: str, *, loud: bool = False, **fields: Any) -> Frame:
    """A frame of this layer's own news, shaped like the server's frames."""
    return {"type": "e2e", "kind": kind, "loud": loud, "text": text, **fields}


def new_device_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(DEVICE_ID_CHARS))


class Secure:
    """One device's end-to-end layer over a ChatClient (see the module's docstring)."""

    def __init__(self, machine: E2E, *, timeout: float = DEFAULT_TIMEOUT,
                 ack: bool = True, verified_only: bool = False) -> None:
        self.machine = machine
        self.timeout = timeout
        # Room keys go only to devices this one verified (the client's setting).
        self.verified_only = verified_only
        self._unshared: set[tuple[str, str, str]] = set()  # told: no keys for the device
        # Tests turn this off to stand for a client killed between commit and ack.
        self.ack = ack
        self.client: ChatClient | None = None
        self._lock = threading.RLock()
        self._fresh: set[str] = set()  # users whose keys we asked for on this connection
        self._plain_rooms: set[str] = set()  # rooms the server said are not encrypted
        self._announced: set[str] = set()  # SAS transactions whose codes were shown
        self._notices: deque[Frame] = deque()  # news made outside `process`, shown next
        # Where news goes at once, if set (the SecureClient's event queue): news made by a
        # send or a /devices must not wait for the next frame from the server to show.
        self.notify: Callable[[Frame], None] | None = None
        self._current_txn: str | None = None  # the verification /verify confirm means

    @classmethod
    def open(cls, server: str, username: str, environ: Mapping[str, str] = os.environ, *,
             passphrase: str | None = None, rotate_messages: int = ROTATE_AFTER_MESSAGES,
             rotate_seconds: float = ROTATE_AFTER_SECONDS, **kw: Any) -> Secure:
        """Open (or make) this user's key store for `server` ("host:port") and its device."""
        store = KeyStore.for_device(server, username, environ, passphrase=passphrase)
        owner = store.get_meta("device")
        device = owner.split("/", 1)[1] if owner else new_device_id()
        return cls(E2E(store, username, device, rotate_after_messages=rotate_messages,
                       rotate_after_seconds=rotate_seconds), **kw)

    @staticmethod
    def supported(client: ChatClient) -> bool:
        features = client.hello.get("features")
        return isinstance(features, list) and FEATURE in features

    @property
    def device(self) -> str:
        return self.machine.device

    @property
    def user(self) -> str:
        return self.machine.user

    def __repr__(self) -> str:
        return f"Secure({self.machine.user}/{self.machine.device})"

    def close(self) -> None:
        with self._lock:
            self.machine.store.close()

    # -- a connection -----------------------------------------------------------------

    def attach(self, client: ChatClient) -> list[Frame]:
        """Bind a logged-in connection to this device: publish the device's keys and
        one-time keys, send what the outbox holds, and ask again for the keys of everyone
        we encrypt for (notices are not kept across connections). Its queued to-device
        messages follow as events. Returns the news (new or changed devices)."""
        with self._lock:
            self.client = client
            limit = client.hello.get("max_frame_bytes")
            if type(limit) is int and limit > 0:
                self.machine.max_frame_bytes = limit  # to_device requests are split to fit
            self._fresh.clear()
            self._plain_rooms.clear()
            reply = self._request(self.machine.device_keys_request())
            if reply.get("type") != "ok":
                raise SecureError(f"the server refused this device's keys: "
                                  f"{reply.get('message', reply.get('code'))}")
            self._top_up(reply.get("one_time_keys"))
            self._flush_outbox()
            users = self.machine.store.known_users()
            if users:
                self._query(users, force=True)
            return self._drain()

    def _request(self, frame: Frame) -> Frame:
        if self.client is None:
            raise SecureError("not attached to a connection")
        # quiet: the user did not type these; their replies are not events.
        with self._wire():
            return self.client.request(frame, self.timeout, quiet=True)

    def _wire(self) -> AbstractContextManager[None]:
        """Around our own use of the client: a SecureClient (which hands sends to us)
        then sends them as they are, instead of back to us."""
        raw = getattr(self._client(), "raw", None)
        return raw() if raw is not None else nullcontext()

    def _top_up(self, held: object) -> None:
        if type(held) is not int:
            return
        request = self.machine.one_time_keys_request(held)
        if request is not None and self._request(request).get("type") == "ok":
            self.machine.keys_published()

    def _flush_outbox(self) -> None:
        """Send every stored to_device request, oldest first, exactly as stored."""
        for request in self.machine.outbox():
            reply = self._request(request)
            if reply.get("type") == "ok":
                self.machine.to_device_sent(request["send_id"])
                for skip in reply.get("skipped") or []:
                    self._note(notice(
                        "warning", f"keys for {skip.get('username')}/{skip.get('device')} "
                        f"were not delivered ({skip.get('reason')})"))
            elif reply.get("code") == "rate_limited":
                # Still refused after the client's own waits: kept, and sent again (same
                # send_id) before the next message or at the next connection.
                raise SecureError("the server is refusing for the rate; try again shortly")
            else:
                # Refused for good (a retry would be refused again): said, not kept.
                self.machine.to_device_sent(request["send_id"])
                self._note(notice(
                    "warning", "the server refused keys we sent: "
                    f"{reply.get('message', reply.get('code'))}", loud=True))

    def _query(self, users: Iterable[str], *, force: bool = False) -> None:
        """Ask for the devices of `users` not asked for on this connection yet."""
        wanted = sorted({u.lower() for u in users} - (set() if force else self._fresh))
        for start in range(0, len(wanted), MAX_QUERIED_USERS):  # what one query takes
            batch = wanted[start:start + MAX_QUERIED_USERS]
            reply = self._request({"type": "query_keys", "users": batch})
            if reply.get("type") != "keys":
                continue
            for n in self.machine.receive_keys(reply, asked=batch):
                # A new device of someone we know reads what we send from now on: said
                # as loudly as a changed key, so that the user may check it.
                loud = n.loud or n.kind == "new_device"
                self._note(notice(n.kind, n.text, loud=loud,
                                            username=n.username, device=n.device))
            self._fresh.update(batch)

    def _note(self, frame: Frame) -> None:
        if self.notify is not None:
            self.notify(frame)
        else:
            self._notices.append(frame)

    def _drain(self) -> list[Frame]:
        out = []
        while self._notices:
            out.append(self._notices.popleft())
        return out

    # -- receiving --------------------------------------------------------------------

    def events(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        """What to show for each frame of `frames` (a ChatClient's `events()`)."""
        for frame in frames:
            yield from self.process(frame)

    def notices(self) -> list[Frame]:
        """News made by sending (a new device seen meanwhile...), not shown yet."""
        with self._lock:
            return self._drain()

    def process(self, frame: Frame) -> list[Frame]:
        """What to show for one frame from the server (see the module's docstring)."""
        with self._lock:
            kind = frame.get("type")
            if kind in ("to_device", "key_count", "device_list"):
                try:
                    out = self._on_machinery(frame)
                except ConnectionClosed:
                    # Nothing was acknowledged: the server gives it again at the next
                    # bind, and `attach` asks again for everyone's keys.
                    out = []
                except (ClientError, E2EError) as e:
                    # What was not acknowledged is given again at the next bind.
                    out = [notice("warning", f"end-to-end: {e}", loud=True)]
            elif kind == "message":
                out = [self.decrypt_message(frame)]
            elif kind == "history":
                out = [self.decrypt_history(frame)]
            else:
                self._observe(frame)
                out = [frame]
            return self._drain() + out

    def _on_machinery(self, frame: Frame) -> list[Frame]:
        kind = frame.get("type")
        if kind == "to_device":
            return self._on_to_device(frame)
        if kind == "key_count":
            self._top_up(frame.get("one_time_keys"))
        elif isinstance(frame.get("username"), str):  # device_list
            self._fresh.discard(frame["username"].lower())
            self._query([frame["username"]])
        return []

    def _observe(self, frame: Frame) -> None:
        """Rooms the server says are encrypted are pinned; members leaving rotate."""
        kind = frame.get("type")
        if kind in ("ok", "room") and frame.get("encrypted") is True \
                and isinstance(frame.get("room"), str):
            self.machine.pin_encrypted(room_conversation(frame["room"]))
        elif kind == "rooms" and isinstance(frame.get("rooms"), list):
            for room in frame["rooms"]:
                if isinstance(room, dict) and room.get("encrypted") is True \
                        and isinstance(room.get("room"), str):
                    self.machine.pin_encrypted(room_conversation(room["room"]))
        elif kind == "presence" and frame.get("event") == "leave" \
                and frame.get("cause") != "connection" and isinstance(frame.get("room"), str):
            conversation = room_conversation(frame["room"])
            if self.machine.must_encrypt(conversation):
                self.machine.rotate(conversation)

    def _on_to_device(self, frame: Frame) -> list[Frame]:
        result = self.machine.receive_to_device(frame)
        if result.needs_keys is not None:
            # A device we have not seen: its owner's keys first, then judged on them.
            self._fresh.discard(result.needs_keys.lower())
            self._query([result.needs_keys])
            result = self.machine.receive_to_device(frame)
        if result.ack is not None and self.ack:
            self._request({"type": "to_device_ack", "upto": result.ack})
        if result.requests:
            self._flush_outbox()  # verification replies, queued by the machine
        return self._to_device_news(result)

    def _to_device_news(self, result: ToDeviceResult) -> list[Frame]:
        who = f"{result.sender}/{result.device}"
        if result.status is Status.REFUSED:
            return [notice("warning", f"a to-device message from {who} was refused: "
                           f"{result.reason}", loud=True, username=result.sender,
                           device=result.device)]
        if result.status is not Status.OK:
            return []  # a duplicate: handled before
        out: list[Frame] = []
        for pending in result.decryptable:
            again = self.decrypt_message(pending, late=True)
            # Shown again only with news: its text, or why it is refused. One that still
            # cannot be read (a key that starts after it) was said so already.
            if again["e2e"]["status"] != Status.PENDING.value:
                out.append(again)
        if result.kind == "sas.start":
            out.append(notice("sas_started", f"{who} asks to verify this device; the codes "
                              "follow", username=result.sender, device=result.device))
        elif result.kind == "sas.cancel":
            out.append(notice("sas_cancelled", result.reason, username=result.sender,
                              device=result.device))
        out += self._codes_ready()
        if result.verified is not None:
            out += self._verified(result.verified)
        return out

    def _codes_ready(self) -> list[Frame]:
        out = []
        for txn, (user, device) in self.machine.verifications().items():
            if txn in self._announced:
                continue
            try:
                codes = self.machine.verification_codes(txn)
            except SasError:  # the keys are not exchanged yet
                continue
            self._announced.add(txn)
            self._current_txn = txn
            emoji = [SAS_EMOJI[i] for i in codes.emoji]
            out.append(notice(
                "sas_codes", f"verifying {user}/{device}: compare "
                + " ".join(f"{e} ({name})" for e, name in emoji)
                + " or " + " ".join(str(d) for d in codes.decimals)
                + "; /verify confirm if they match, /verify cancel if not",
                txn=txn, username=user, device=device, emoji=[e for e, _ in emoji],
                decimals=list(codes.decimals)))
        return out

    def _verified(self, target: Target) -> list[Frame]:
        user, device = target
        out = [notice("verified", f"{user}/{device} is verified", username=user,
                      device=device)]
        if user == self.machine.user:
            # Our own new device: it may read the past now (docs/e2e.md).
            share = self.machine.export_keys_for(device)
            if share.need_sessions:
                self._claim(share.need_sessions)
                share = self.machine.export_keys_for(device)
            self._flush_outbox()
            if share.messages:
                n = len(share.messages)
                out.append(notice("keys_forwarded", f"sent {n} room key{'' if n == 1 else 's'} "
                                  f"to {device}", username=user, device=device))
        return out

    def decrypt_message(self, frame: Frame, *, late: bool = False) -> Frame:
        """A `message` frame as the user should see it (see the module's docstring)."""
        with self._lock:
            if "encrypted" not in frame:
                return self._plaintext(frame)
            got: Decrypted = self.machine.decrypt(frame)
            out = dict(frame)
            if got.status is Status.OK:
                out["message"] = got.text
                e2e: dict[str, Any] = {"status": "ok", "verified": got.verified,
                                       "device": got.device}
            else:
                e2e = {"status": got.status.value, "reason": got.reason}
            if late:
                e2e["late"] = True
            out["e2e"] = e2e
            return out

    def _plaintext(self, frame: Frame) -> Frame:
        if isinstance(frame.get("room"), str):
            if not self.machine.must_encrypt(room_conversation(frame["room"])):
                return frame
            # The server stores no plaintext in an encrypted room: this one is forged.
            return {**frame, "e2e": {"status": "refused", "reason":
                                     "a plaintext message in an encrypted room"}}
        if isinstance(frame.get("to"), str) and isinstance(frame.get("username"), str):
            e2e: dict[str, Any] = {"status": "plaintext"}
            if self.machine.must_encrypt(dm_conversation(frame["username"], frame["to"])):
                e2e["reason"] = "not encrypted, in a conversation that was"
            return {**frame, "e2e": e2e}
        return frame

    def decrypt_history(self, frame: Frame) -> Frame:
        """A `history` reply with each message decrypted (or marked)."""
        messages = frame.get("messages")
        if frame.get("type") != "history" or not isinstance(messages, list):
            return frame
        where = {"room": frame["room"]} if isinstance(frame.get("room"), str) else {}
        out = []
        for message in messages:
            if isinstance(message, dict):
                message = self.decrypt_message({**where, **message})
            out.append(message)
        return {**frame, "messages": out}

    # -- sending ----------------------------------------------------------------------

    def room_encrypted(self, room: str) -> bool:
        """Whether messages to `room` must be encrypted: pinned, or so says room_info."""
        conversation = room_conversation(room)
        with self._lock:
            if self.machine.must_encrypt(conversation):
                return True
            if conversation in self._plain_rooms:
                return False
            info = self._request({"type": "room_info", "room": room})
            if info.get("type") != "room":
                return False  # not ours to read: the send will be refused the same way
            if info.get("encrypted") is True:
                self.machine.pin_encrypted(conversation)
                return True
            self._plain_rooms.add(conversation)  # never changes: encryption is for life
            return False

    def say(self, room: str, text: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Send to a room: encrypted if the room is; the reply (decrypted). Raises
        SecureError (nothing was sent) when the members cannot be listed."""
        client = self._client()
        if not self.room_encrypted(room):
            with self._wire():
                return client.say(room, text, timeout)
        with self._lock:
            conversation = room_conversation(room)
            members = self._request({"type": "members", "room": room})
            if members.get("type") != "members":
                raise SecureError(f"nothing sent: the members of {room} are not known "
                                  f"({members.get('message', members.get('code'))})")
            users = [m["username"] for m in members.get("members", [])
                     if isinstance(m, dict) and isinstance(m.get("username"), str)]
            # Someone who had the current session and is no longer a member (kicked,
            # banned, left while we were away) must not read what comes next.
            if self.machine.shared_users(conversation) - {u.lower() for u in users}:
                self.machine.rotate(conversation)
            envelope = self._encrypt_for(conversation, users, text)
            with self._wire():
                reply = client.request({"type": "send", "room": room, "encrypted": envelope},
                                       timeout)
            return self.decrypt_message(reply) if reply.get("type") == "message" else reply

    def direct(self, user: str, text: str, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """A direct message: encrypted when the peer has a device (and always once it
        was: SecureError, nothing sent, if the peer seems to have none any more);
        plaintext to a peer with no device, which is marked so."""
        client = self._client()
        with self._lock:
            conversation = dm_conversation(self.machine.user, user)
            self._query([user, self.machine.user])
            usable = [d for d in self.machine.devices(user) if d.trusted]
            if not usable and user.lower() != self.machine.user:
                if self.machine.must_encrypt(conversation):
                    # A server may hide someone's devices to have us write in clear.
                    raise SecureError(f"nothing sent: {user} has no device to encrypt "
                                      "for any more, and this conversation was encrypted")
                with self._wire():
                    reply = client.direct(user, text, timeout)
                return self._plaintext(reply) if reply.get("type") == "message" else reply
            self.machine.pin_encrypted(conversation)
            envelope = self._encrypt_for(conversation, [user, self.machine.user], text)
            with self._wire():
                reply = client.request({"type": "send", "to": user, "encrypted": envelope},
                                       timeout)
            return self.decrypt_message(reply) if reply.get("type") == "message" else reply

    def _encrypt_for(self, conversation: str, users: list[str], text: str
                     ) -> dict[str, Any]:
        """Give the conversation's session to every device of `users` that lacks it
        (claiming one-time keys where there is no Olm session yet), send those keys,
        then encrypt: nothing goes out under a key its readers were not sent first."""
        self._query(users)
        targets = [(d.username, d.device) for u in users for d in self.machine.devices(u)
                   if d.trusted]
        self._claim(self.machine.sessions_needed(targets))
        share = self.machine.prepare(conversation, targets,
                                     only_verified=self.verified_only)
        for user, device in share.need_sessions:
            self._note(notice("warning", f"no keys could be given to {user}/"
                                        f"{device}: it has no one-time key", loud=True,
                                        username=user, device=device))
        for user, device, why in share.skipped:
            if why == "not verified" and (conversation, user, device) not in self._unshared:
                # Said once per device and conversation: it cannot read what we send.
                self._unshared.add((conversation, user, device))
                self._note(notice("unshared", f"{user}/{device} gets no keys here (not "
                                  "verified, and verified_only is on): it cannot read your "
                                  "messages; /verify it", username=user, device=device))
        self._flush_outbox()
        return self.machine.encrypt(conversation, text)

    def _claim(self, targets: Iterable[Target]) -> None:
        for user, device in targets:
            reply = self._request({"type": "claim_key", "username": user, "device": device})
            if reply.get("type") != "claimed":
                continue
            try:
                self.machine.receive_claimed(reply)
            except Refused as refusal:
                self._note(notice("warning", refusal.reason, loud=True,
                                            username=user, device=device))

    def _client(self) -> ChatClient:
        if self.client is None:
            raise SecureError("not attached to a connection")
        return self.client

    # -- requests with an end-to-end side ---------------------------------------------

    def create(self, room: str, visibility: str | None = None, history: str | None = None,
               *, encrypted: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Make a room; `encrypted` makes it private and encrypted for good."""
        frame: Frame = {"type": "create", "room": room}
        if encrypted:
            visibility = visibility or "private"
            frame["encrypted"] = True
        if visibility is not None:
            frame["visibility"] = visibility
        if history is not None:
            frame["history"] = history
        with self._wire():
            reply = self._client().request(frame, timeout)
        self.process_reply(reply)
        return reply

    def process_reply(self, reply: Frame) -> None:
        """Learn from a reply the caller got itself (an `ok` saying a room is encrypted)."""
        with self._lock:
            self._observe(reply)

    def kick(self, room: str, username: str, reason: str | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> Frame:
        with self._wire():
            reply = self._client().kick(room, username, reason, timeout)
        self.removed_member(room, reply)
        return reply

    def ban(self, room: str, username: str, reason: str | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> Frame:
        with self._wire():
            reply = self._client().ban(room, username, reason, timeout)
        self.removed_member(room, reply)
        return reply

    def removed_member(self, room: str, reply: Frame) -> None:
        """After our kick or ban: a new session, which the removed one will not get."""
        if reply.get("type") == "ok":
            with self._lock:
                conversation = room_conversation(room)
                if self.machine.must_encrypt(conversation):
                    self.machine.rotate(conversation)

    def history(self, *args: Any, **kwargs: Any) -> Frame:
        """ChatClient.history, its messages decrypted."""
        with self._wire():
            reply = self._client().history(*args, **kwargs)
        return self.decrypt_history(reply)

    # -- devices and verification -----------------------------------------------------

    def fingerprint(self) -> str:
        return self.machine.fingerprint()

    def devices(self, user: str) -> list[Device]:
        """`user`'s devices as the directory lists them now (asked for again)."""
        with self._lock:
            self._fresh.discard(user.lower())
            self._query([user])
            return self.machine.devices(user)

    def set_blocked(self, user: str, device: str, blocked: bool = True) -> None:
        with self._lock:
            self.machine.set_blocked(user, device, blocked)

    def start_verification(self, user: str, device: str | None = None) -> str:
        """Start SAS with one of `user`'s devices (the only other one if not named);
        the transaction id. The codes come as an `e2e` `sas_codes` event."""
        with self._lock:
            self._query([user])
            if device is None:
                others = [d.device for d in self.machine.devices(user) if d.trusted
                          and (d.username, d.device) != (self.user, self.device)]
                if not others:
                    raise SecureError(f"{user} has no device to verify (an older client, "
                                      "or not logged in with encryption yet)")
                if len(others) != 1:
                    raise SecureError(f"{user} has {len(others)} devices: name one "
                                      f"({', '.join(others)})")
                device = others[0]
            self._claim(self.machine.sessions_needed([(user, device)]))
            try:
                txn, _request = self.machine.start_verification(user, device)
            except Refused as refusal:
                raise SecureError(refusal.reason) from None
            self._flush_outbox()
            return txn

    def confirm_verification(self, txn: str) -> list[Frame]:
        """The user says the codes match: our MAC goes out; news (verified) if the
        other side's came already."""
        with self._lock:
            flows = self.machine.verifications()
            _request, done = self.machine.confirm_verification(txn)
            self._flush_outbox()
            if done and txn in flows:
                return self._drain() + self._verified(flows[txn])
            return self._drain()

    def cancel_verification(self, txn: str, reason: str = "cancelled by the user") -> None:
        with self._lock:
            self.machine.cancel_verification(txn, reason)
            self._flush_outbox()

    def verifications(self) -> dict[str, Target]:
        with self._lock:
            return self.machine.verifications()

    def current_verification(self) -> str | None:
        """The verification whose codes were shown last, if still in progress."""
        with self._lock:
            txn = self._current_txn
            return txn if txn in self.machine.verifications() else None
