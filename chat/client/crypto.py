"""The client's end-to-end encryption core, sans-IO: frames and payloads in, payloads out.

Theory of operation. `E2E` owns one device's cryptographic state through its `KeyStore`
(the transport and the UI never touch a key): the Olm account, Olm sessions with other
devices (for to-device payloads: room keys, forwarded keys, verification), Megolm
sessions per conversation (for messages), and what it knows of other devices (trust on
first use, verification). It never opens a socket: methods take the server's frames and
return the requests to send; the caller does the I/O and the waiting.

A conversation is a room or a pair of users (conversations.py); results and errors
are in e2e_results.py; SAS verification's steps in sas.py.

Failure and durability: each public method that changes state does it in one key store
transaction, committed before it returns. `receive_to_device` commits what a to-device
message changed (and the highest `seq` handled, so a message the server sends again is
skipped, not decrypted twice) before it returns, and only then may the caller send
`to_device_ack` (`ToDeviceResult.ack`). Outbound Olm and Megolm ratchets are saved
before their ciphertext is returned, so a crash never makes a device encrypt twice
with the same message key; the `to_device` requests carrying them wait in the store's
outbox, committed with them, until the server took them (`to_device_sent`). Since the
machine is not thread-safe, one thread at a time calls it (chat.client.secure
holds a lock around every use); verification
attempts in progress live in memory only. Nothing the client receives is dropped silently: a result
is `ok`, `pending` (cannot decrypt yet, with the reason, kept in the store) or
`refused` (a warning for the user, with the reason).

Formats and checks are described in docs/e2e.md.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import vodozemac

from chat.client.conversations import (
    check_plaintext,
    conversation_of,
    dm_members,
    make_plaintext,
)
from chat.client.e2e_results import (
    Decrypted,
    DeviceNotice,
    E2EError,
    Refused,
    Share,
    Status,
    Target,
    ToDeviceResult,
)
from chat.client.keystore import Device, InboundRecord, KeyStore
from chat.client.sas import SAS_TYPES, Codes, Party, SasError, Verification
from chat.devices import canonical
from chat.protocol import DEFAULT_MAX_FRAME_BYTES, encode

# Matrix's defaults for Megolm rotation: a new session after 100 messages or a week,
# whichever comes first, bounds what one leaked session key opens.
ROTATE_AFTER_MESSAGES = 100
ROTATE_AFTER_SECONDS = 7 * 24 * 3600
# vodozemac keeps at most 50 unpublished one-time keys; the server holds up to 100.
# Topping up to 50 when fewer than half are left leaves room for a burst of claims
# (each new peer claims one) between two key_count notices.
ONE_TIME_KEYS_TARGET = 50

ROOM_KEY, FORWARDED_ROOM_KEY = "room_key", "forwarded_room_key"
# A to_device request's bytes beyond its messages: the type, a 22-character send_id,
# the "id" the client library adds, brackets and the newline, with room to spare.
REQUEST_OVERHEAD = 128


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _strings(obj: dict[str, Any], names: tuple[str, ...], what: str) -> list[str]:
    """The named fields, each a string, or a refusal naming what was malformed."""
    values = [obj.get(name) for name in names]
    if not all(isinstance(v, str) for v in values):
        raise Refused(f"{what} with missing fields")
    return values  # type: ignore[return-value]  # all checked to be str just above


def _json(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Refused("the decrypted payload is not JSON") from None
    if not isinstance(obj, dict):
        raise Refused("the decrypted payload is not an object")
    return obj


class E2E:
    """One device's end-to-end machine. See the module's docstring."""

    def __init__(self, store: KeyStore, username: str, device: str, *,
                 rotate_after_messages: int = ROTATE_AFTER_MESSAGES,
                 rotate_after_seconds: float = ROTATE_AFTER_SECONDS,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.username = username
        self.user = username.lower()
        self.device = device
        self.rotate_after_messages = rotate_after_messages
        self.rotate_after_seconds = rotate_after_seconds
        self.max_frame_bytes = max_frame_bytes  # the server's, from its hello
        self._clock = clock
        self._verifications: dict[str, Verification] = {}
        # Users a to-device frame came from whose device we did not know: True once
        # their keys came (then that frame is judged on them, not deferred again).
        self._awaiting_keys: dict[str, bool] = {}
        owner = store.get_meta("device")
        if owner is not None and owner != f"{self.user}/{device}":
            raise E2EError(f"{store.path} belongs to {owner}, not {self.user}/{device}")
        account = store.load_account(vodozemac.Account)
        if account is None:
            account = vodozemac.Account()
            with store.transaction():
                store.set_meta("device", f"{self.user}/{device}")
                store.save_account(account)
        self._account = account

    def __repr__(self) -> str:
        return f"E2E({self.user}/{self.device})"

    # -- own keys -------------------------------------------------------------------

    @property
    def ed25519(self) -> str:
        return self._account.ed25519_key.to_base64()

    @property
    def curve25519(self) -> str:
        return self._account.curve25519_key.to_base64()

    def fingerprint(self) -> str:
        """This device's Ed25519 key in groups of four, for reading out loud."""
        key = self.ed25519
        return " ".join(key[i:i + 4] for i in range(0, len(key), 4))

    def _sign(self, obj: dict[str, Any]) -> str:
        return self._account.sign(canonical(obj)).to_base64()

    def device_keys_request(self) -> dict[str, Any]:
        """The `device_keys` request that binds a session to this device."""
        signed = {"curve25519": self.curve25519, "device": self.device,
                  "ed25519": self.ed25519, "user": self.username}
        return {"type": "device_keys", "device": self.device, "curve25519": self.curve25519,
                "ed25519": self.ed25519, "signature": self._sign(signed)}

    def one_time_keys_request(self, held: int = 0) -> dict[str, Any] | None:
        """A `one_time_keys` request topping the server up to the target, given the
        count it holds (from the `ok` of `device_keys` or a `key_count`), with a
        fallback key the first time; None when nothing is needed. Keys not yet
        published (an answer lost) are sent again; call `keys_published` on the `ok`."""
        with self.store.transaction():
            unpublished = len(self._account.one_time_keys)
            wanted = ONE_TIME_KEYS_TARGET - held - unpublished
            if held >= ONE_TIME_KEYS_TARGET // 2 and not unpublished:
                return None
            if wanted > 0:
                self._account.generate_one_time_keys(
                    min(wanted, self._account.max_number_of_one_time_keys - unpublished))
            if self.store.get_meta("fallback_published") is None \
                    and not self._account.fallback_key:
                self._account.generate_fallback_key()
            self.store.save_account(self._account)
        keys = []
        for key_id, key in sorted(self._account.one_time_keys.items()):
            signed = {"device": self.device, "id": key_id, "key": key.to_base64(),
                      "user": self.username}
            keys.append({"id": key_id, "key": key.to_base64(), "signature": self._sign(signed)})
        request: dict[str, Any] = {"type": "one_time_keys", "device": self.device,
                                   "keys": keys}
        for key_id, key in self._account.fallback_key.items():
            signed = {"device": self.device, "fallback": True, "id": key_id,
                      "key": key.to_base64(), "user": self.username}
            request["fallback"] = {"id": key_id, "key": key.to_base64(),
                                   "signature": self._sign(signed)}
        if not keys and "fallback" not in request:
            return None
        return request

    def keys_published(self) -> None:
        """The server answered `ok` to `one_time_keys_request`'s request."""
        with self.store.transaction():
            if self._account.fallback_key:
                self.store.set_meta("fallback_published", "1")
            self._account.mark_keys_as_published()
            self.store.save_account(self._account)

    # -- other devices: trust on first use ------------------------------------------

    def receive_keys(self, frame: dict[str, Any], asked: Iterable[str] = ()
                     ) -> list[DeviceNotice]:
        """A `keys` reply (to `query_keys`): record each user's devices. `asked` are the
        users the query named: one the reply leaves out has no devices (any more)."""
        notices: list[DeviceNotice] = []
        users = dict.fromkeys(u.lower() for u in asked)
        for username, devices in (frame.get("users") or {}).items():
            if isinstance(username, str) and isinstance(devices, list):
                users.pop(username.lower(), None)
                notices += self.observe_devices(username, devices)
        for username in users:
            notices += self.observe_devices(username, [])
        return notices

    def observe_devices(self, username: str, devices: list[dict[str, Any]]) -> list[DeviceNotice]:
        """Record the devices the directory lists for `username` (its whole list).

        A device first seen is trusted on first use. Other keys under a known device id
        are never used (the device becomes "changed"): the server or someone else is
        passing off a key as that device's. A new device of a user already known is
        told too, since it will read what is shared with that user from now on."""
        user = username.lower()
        if user in self._awaiting_keys:
            self._awaiting_keys[user] = True
        known = {d.device: d for d in self.store.devices_of(user)}
        notices: list[DeviceNotice] = []
        listed: set[str] = set()
        # Our own account's devices are all news once we have looked at them once; the
        # first look (a new device learning its siblings) is trust on first use.
        own_seen = user == self.user and self.store.get_meta("own_devices_seen") is not None
        with self.store.transaction():
            if user == self.user:
                self.store.set_meta("own_devices_seen", "1")
            for entry in devices:
                try:
                    device, curve, ed = self._checked_device(username, entry)
                except Refused as e:
                    # Listed, if wrongly: not a reason to forget the device we know.
                    listed.add(str(entry.get("device")))
                    notices.append(DeviceNotice(user, str(entry.get("device"))[:32],
                                                "bad_signature", True, e.reason))
                    continue
                listed.add(device)
                if user == self.user and device == self.device:
                    if (curve, ed) != (self.curve25519, self.ed25519):
                        notices.append(DeviceNotice(
                            user, device, "changed_key", True,
                            f"the server lists other keys for this very device ({device})"))
                    continue
                old = known.get(device)
                if old is None:
                    self.store.add_device(user, device, ed, curve)
                    # A user already known (ourselves, once looked at): someone new
                    # will read.
                    if known or own_seen:
                        notices.append(DeviceNotice(
                            user, device, "new_device", False,
                            f"{username} has a new device {device} ({_group(ed)}): it will "
                            f"read what you send from now on; /verify {username} {device} "
                            "to check it is theirs" + (
                                " (if it is not yours, tell the server's operator and change "
                                "your password)" if user == self.user else "")))
                elif (old.ed25519, old.curve25519) != (ed, curve):
                    if old.state != "changed":
                        self.store.set_device_state(user, device, "changed")
                        notices.append(DeviceNotice(
                            user, device, "changed_key", True,
                            f"WARNING: the keys of {username}'s device {device} changed; "
                            "someone may be impersonating it. It will not be used."))
                elif old.state == "gone":
                    self.store.set_device_state(user, device, "ok")
                    notices.append(DeviceNotice(user, device, "new_device", False,
                                                f"{username}'s device {device} is back"))
            for device, old in known.items():
                if device not in listed and old.state in ("ok", "blocked"):
                    self.store.set_device_state(user, device, "gone")
                    notices.append(DeviceNotice(user, device, "removed", False,
                                                f"{username}'s device {device} was removed"))
            # A device that left, or whose key is now in doubt, must not read what comes
            # next with a session it was given: every session it had is replaced.
            for notice in notices:
                if notice.kind in ("removed", "changed_key"):
                    for conversation in self.store.outbound_shared_with(user, notice.device):
                        self.store.drop_outbound(conversation)
        return notices

    def _checked_device(self, username: str, entry: dict[str, Any]) -> tuple[str, str, str]:
        device, curve, ed, sig = _strings(entry, ("device", "curve25519", "ed25519",
                                                  "signature"), f"{username}: a device entry")
        signed = {"curve25519": curve, "device": device, "ed25519": ed, "user": username}
        _verify(ed, sig, signed, f"{username}'s device {device}")
        return device, curve, ed

    def devices(self, username: str) -> list[Device]:
        return self.store.devices_of(username)

    def set_blocked(self, username: str, device: str, blocked: bool = True) -> None:
        with self.store.transaction():
            self.store.set_device_state(username, device, "blocked" if blocked else "ok")

    def _usable(self, username: str, device: str) -> Device:
        known = self.store.device(username, device)
        if known is None:
            raise Refused(f"{username}'s device {device} is unknown (query its keys first)")
        if not known.trusted:
            raise Refused(f"{username}'s device {device} is not used ({known.state})")
        return known

    # -- Olm: sessions and to-device payloads ---------------------------------------

    def sessions_needed(self, targets: Iterable[Target]) -> list[Target]:
        """The targets with no Olm session yet: `claim_key` each one."""
        out = []
        for username, device in targets:
            known = self.store.device(username, device)
            if known is not None and known.trusted \
                    and not self.store.olm_sessions(vodozemac.Session, known.curve25519):
                out.append((username.lower(), device))
        return out

    def receive_claimed(self, frame: dict[str, Any]) -> None:
        """A `claimed` reply: check the key was signed by the device, start a session."""
        username, device, key = frame.get("username"), frame.get("device"), frame.get("key")
        if not isinstance(username, str) or not isinstance(device, str) \
                or not isinstance(key, dict):
            raise Refused("a claimed reply with missing fields")
        known = self._usable(username, device)
        signed: dict[str, Any] = {"device": device, "id": key.get("id"),
                                  "key": key.get("key"), "user": username}
        if key.get("fallback"):
            signed["fallback"] = True
        _verify(known.ed25519, key.get("signature"), signed,
                f"{username}'s device {device}'s one-time key")
        try:
            session = self._account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(known.curve25519),
                vodozemac.Curve25519PublicKey.from_base64(key["key"]))
        except (ValueError, TypeError):
            raise Refused(f"{username}'s device {device}: the one-time key is unusable") \
                from None
        with self.store.transaction():
            self.store.save_olm_session(known.curve25519, session)

    def encrypt_to_device(self, username: str, device: str, kind: str,
                          content: dict[str, Any]) -> dict[str, Any]:
        """One entry of a `to_device` request: `content` as a `kind` payload, Olm
        encrypted for that device (which must be known, trusted, with a session). Not
        queued: the caller must not lose it (the methods below queue what they make)."""
        with self.store.transaction():
            return self._encrypt_olm(self._usable(username, device), kind, content)

    def _encrypt_olm(self, target: Device, kind: str, content: dict[str, Any]) -> dict[str, Any]:
        sessions = self.store.olm_sessions(vodozemac.Session, target.curve25519)
        if not sessions:
            raise E2EError(f"no Olm session with {target.username}/{target.device}: "
                           "claim a key first")
        session = sessions[0]
        payload = {"type": kind, "sender": self.username, "sender_device": self.device,
                   "keys": {"ed25519": self.ed25519}, "recipient": target.username,
                   "recipient_device": target.device,
                   "recipient_keys": {"ed25519": target.ed25519}, "content": content}
        message_type, body = session.encrypt(json.dumps(payload).encode()).to_parts()
        self.store.save_olm_session(target.curve25519, session)
        return {"username": target.username, "device": target.device,
                "olm": {"type": message_type, "body": _b64(body),
                        "sender_key": self.curve25519}}

    def _enqueue(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put `to_device` requests in the outbox, in the caller's transaction, as many
        as it takes to keep each within the server's frame size. The Olm ratchets have
        moved on and `prepare` counts these keys as given, so the requests must reach
        the server even if the client stops before sending them."""
        requests: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        room = self.max_frame_bytes - REQUEST_OVERHEAD
        size = 0
        for message in messages:
            grows = len(encode(message))  # its JSON; the newline stands for the comma
            if grows > room:
                raise E2EError(f"a to-device message of {grows} bytes cannot be sent")
            if batch and size + grows > room:
                requests.append(self._queue(batch))
                batch, size = [], 0
            batch.append(message)
            size += grows
        if batch:
            requests.append(self._queue(batch))
        return requests

    def _queue(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        send_id = secrets.token_urlsafe(16)  # 22 of A-Z a-z 0-9 - _, as send_id wants
        request = {"type": "to_device", "send_id": send_id, "messages": messages}
        self.store.add_outbox(send_id, request)
        return request

    def outbox(self) -> list[dict[str, Any]]:
        """The `to_device` requests not yet answered `ok`, oldest first: send them again
        after a reconnect (the server recognises a repeated send_id)."""
        return self.store.outbox()

    def to_device_sent(self, send_id: str) -> None:
        """The server answered `ok` to the request with this send_id."""
        with self.store.transaction():
            self.store.drop_outbox(send_id)

    def pin_encrypted(self, conversation: str) -> None:
        """Remember that the conversation is encrypted: from now on `must_encrypt` says
        so whatever the server claims (a room shown as unencrypted, a user shown with
        no devices), so that a server cannot turn encryption off for it."""
        with self.store.transaction():
            self.store.pin_encrypted(conversation)

    def must_encrypt(self, conversation: str) -> bool:
        return self.store.is_pinned(conversation)

    def receive_to_device_page(self, frames: Iterable[dict[str, Any]]
                               ) -> tuple[list[ToDeviceResult], int | None]:
        """Handle frames in order; stop at one that needs keys. Returns the results and
        the `upto` to acknowledge (None: nothing to acknowledge)."""
        results, upto = [], None
        for frame in frames:
            result = self.receive_to_device(frame)
            results.append(result)
            if result.ack is None:
                break
            upto = result.ack
        return results, upto

    def receive_to_device(self, frame: dict[str, Any]) -> ToDeviceResult:
        """A `to_device` frame: decrypt, check, apply, commit. Acknowledge `ack` after."""
        seq = frame.get("seq")
        if not isinstance(seq, int):
            raise E2EError("a to_device frame without seq")
        sender, device = str(frame.get("username", "")), str(frame.get("device", ""))
        last = int(self.store.get_meta("to_device_seq") or 0)
        if seq <= last:
            return ToDeviceResult(seq, Status.DUPLICATE, seq, sender=sender, device=device)
        known = self.store.device(sender, device)
        keys_came = self._awaiting_keys.pop(sender.lower(), False)
        if known is None and not keys_came:
            # Nothing is decrypted or committed: decrypting would spend the Olm message,
            # and what it says cannot be checked without the device's keys.
            self._awaiting_keys[sender.lower()] = False
            return ToDeviceResult(seq, Status.PENDING, None, sender=sender, device=device,
                                  reason=f"unknown device {sender}/{device}: query its keys",
                                  needs_keys=sender)
        if known is None:  # its owner's keys came since, without it
            with self.store.transaction():
                self.store.set_meta("to_device_seq", str(seq))
            return ToDeviceResult(seq, Status.REFUSED, seq, sender=sender, device=device,
                                  reason=f"a message from {sender}/{device}, a device that "
                                  "is not in the directory")
        with self.store.transaction():
            self.store.set_meta("to_device_seq", str(seq))
            try:
                payload = self._decrypt_olm(known, frame.get("olm"))
            except Refused as refusal:
                return ToDeviceResult(seq, Status.REFUSED, seq, sender=sender, device=device,
                                      reason=refusal.reason)
            # From here the Olm session advanced: a refusal of the payload keeps that
            # (the message was spent) but applies nothing of it.
            try:
                result = self._apply(seq, known, payload)
            except Refused as refusal:
                replies = [refusal.reply] if isinstance(refusal, _RefusedWithReply) else []
                result = ToDeviceResult(seq, Status.REFUSED, seq,
                                        kind=str(payload.get("type"))[:32], sender=sender,
                                        device=device, reason=refusal.reason, replies=replies)
            # Replies (verification steps) are queued in the same commit as the state
            # they come from, so that neither is lost without the other.
            return dataclasses.replace(result, requests=self._enqueue(result.replies))

    def _decrypt_olm(self, known: Device, olm: Any) -> dict[str, Any]:
        """Decrypt and save the session; the caller's transaction commits it."""
        who = f"{known.username}/{known.device}"
        if not isinstance(olm, dict) or olm.get("type") not in (0, 1) \
                or not isinstance(olm.get("body"), str):
            raise Refused(f"a malformed Olm message from {who}")
        if not known.trusted:
            raise Refused(f"a message from {who}, whose device is {known.state}")
        if olm.get("sender_key") != known.curve25519:
            raise Refused(f"a message from {who} with another key than the device's")
        try:
            message = vodozemac.AnyOlmMessage.from_parts(olm["type"], _unb64(olm["body"]))
        except ValueError:
            raise Refused(f"a malformed Olm message from {who}") from None
        sessions = self.store.olm_sessions(vodozemac.Session, known.curve25519)
        prekey = message.to_pre_key() if olm["type"] == 0 else None
        for session in sessions:
            if prekey is not None and not session.session_matches(prekey):
                continue
            try:
                plaintext = session.decrypt(message)
            except ValueError:
                continue
            self.store.save_olm_session(known.curve25519, session)
            return _json(plaintext)
        if prekey is None:
            raise Refused(f"an Olm message from {who} that no session decrypts")
        try:
            session, plaintext = self._account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(known.curve25519), prekey)
        except ValueError:
            raise Refused(f"an Olm pre-key message from {who} that cannot be used") from None
        self.store.save_olm_session(known.curve25519, session)
        self.store.save_account(self._account)  # its one-time key is spent
        return _json(plaintext)

    def _apply(self, seq: int, known: Device, payload: dict[str, Any]) -> ToDeviceResult:
        self._check_envelope(known, payload)
        kind, content = payload["type"], payload.get("content")
        if not isinstance(content, dict):
            raise Refused("a payload without content")
        base = {"seq": seq, "ack": seq, "kind": kind, "sender": known.username,
                "device": known.device}
        if kind == ROOM_KEY:
            session_id = self._receive_room_key(known, content)
            return ToDeviceResult(status=Status.OK, decryptable=self.store.pending(session_id),
                                  **base)
        if kind == FORWARDED_ROOM_KEY:
            session_id = self._receive_forwarded(known, content)
            return ToDeviceResult(status=Status.OK, decryptable=self.store.pending(session_id),
                                  **base)
        if kind in SAS_TYPES:
            replies, verified = self._receive_sas(known, kind, content)
            reason = (f"verification cancelled: {str(content.get('reason', ''))[:100]}"
                      if kind == "sas.cancel" else "")
            return ToDeviceResult(status=Status.OK, replies=replies, verified=verified,
                                  reason=reason, **base)
        raise Refused(f"an unknown payload type {str(kind)[:32]!r}")

    def _check_envelope(self, known: Device, payload: dict[str, Any]) -> None:
        """The Olm plaintext must name who the server says sent it, with the key we
        know for that device, and this very device as its recipient: so that a payload
        cannot be passed on to another device or shown as from someone else."""
        who = f"{known.username}/{known.device}"
        sender = payload.get("sender")
        if not isinstance(sender, str) or sender.lower() != known.username \
                or payload.get("sender_device") != known.device:
            raise Refused(f"a payload from {who} that claims to be from "
                          f"{str(sender)[:32]}/{str(payload.get('sender_device'))[:32]}")
        if (payload.get("keys") or {}).get("ed25519") != known.ed25519:
            raise Refused(f"a payload from {who} signed for another key than the device's")
        recipient = payload.get("recipient")
        if not isinstance(recipient, str) or recipient.lower() != self.user \
                or payload.get("recipient_device") != self.device \
                or (payload.get("recipient_keys") or {}).get("ed25519") != self.ed25519:
            raise Refused(f"a payload from {who} meant for another device")

    # -- Megolm: sending ------------------------------------------------------------

    def _due(self, session: vodozemac.GroupSession, created: float) -> bool:
        return (session.message_index >= self.rotate_after_messages
                or self._clock() - created >= self.rotate_after_seconds)

    def _outbound(self, conversation: str) -> vodozemac.GroupSession:
        loaded = self.store.load_outbound(vodozemac.GroupSession, conversation)
        if loaded is not None and not self._due(*loaded):
            return loaded[0]
        session = vodozemac.GroupSession()
        self.store.save_outbound(conversation, session, self._clock())
        # Our own inbound copy, so that this and our other devices read what we sent.
        inbound = vodozemac.InboundGroupSession(session.session_key)
        self.store.save_inbound(InboundRecord(
            session.session_id, conversation, self.user, self.device, self.curve25519,
            self.ed25519, False, inbound.first_known_index, ""), inbound)
        return session

    def shared_users(self, conversation: str) -> set[str]:
        """The users given the conversation's current outbound session (lower-case): a
        caller rotates when one of them is no longer a member."""
        loaded = self.store.load_outbound(vodozemac.GroupSession, conversation)
        if loaded is None:
            return set()
        return {user for user, _device in self.store.shared_with(loaded[0].session_id)}

    def rotate(self, conversation: str) -> None:
        """Start a new Megolm session at the next `prepare` (call it when someone
        leaves, is kicked or banned, or a device is removed)."""
        with self.store.transaction():
            self.store.drop_outbound(conversation)

    def prepare(self, conversation: str, targets: Iterable[Target], *,
                only_verified: bool = False) -> Share:
        """Share the conversation's current Megolm session (a new one if none, or if
        the current one is due for rotation) with each target device that has not got
        it yet. Send `messages` before the first `encrypt` of the conversation."""
        members = dm_members(conversation)
        messages: list[dict[str, Any]] = []
        need: list[Target] = []
        skipped: list[tuple[str, str, str]] = []
        with self.store.transaction():
            session = self._outbound(conversation)
            shared = self.store.shared_with(session.session_id)
            content = {"conversation": conversation, "session_id": session.session_id,
                       "session_key": session.session_key.to_base64()}
            for username, device in targets:
                user = username.lower()
                if (user, device) == (self.user, self.device) or (user, device) in shared:
                    continue
                if members is not None and user not in members:
                    raise E2EError(f"{username} is not in {conversation}")
                known = self.store.device(user, device)
                if known is None or not known.trusted:
                    skipped.append((user, device, known.state if known else "unknown"))
                elif only_verified and not known.verified:
                    skipped.append((user, device, "not verified"))
                elif not self.store.olm_sessions(vodozemac.Session, known.curve25519):
                    need.append((user, device))
                else:
                    messages.append(self._encrypt_olm(known, ROOM_KEY, content))
                    self.store.mark_shared(session.session_id, user, device)
                    shared.add((user, device))
            requests = self._enqueue(messages)
        return Share(messages, need, skipped, requests)

    def encrypt(self, conversation: str, text: str) -> dict[str, Any]:
        """The `encrypted` object of a `send` to the conversation. `prepare` first: a
        conversation with no current session (or one due for rotation) is an error,
        so that no message goes out under a key nobody was given."""
        loaded = self.store.load_outbound(vodozemac.GroupSession, conversation)
        if loaded is None or self._due(*loaded):
            raise E2EError(f"{conversation}: no current Megolm session; prepare() first")
        session, created = loaded
        plaintext = make_plaintext(conversation, self.user, text)
        with self.store.transaction():
            ciphertext = session.encrypt(json.dumps(plaintext).encode())
            self.store.save_outbound(conversation, session, created)
        return {"algorithm": "megolm", "device": self.device, "sender_key": self.curve25519,
                "session_id": session.session_id, "ciphertext": ciphertext.to_base64()}

    # -- Megolm: receiving ----------------------------------------------------------

    def _receive_room_key(self, known: Device, content: dict[str, Any]) -> str:
        conversation, session_id, key = _strings(
            content, ("conversation", "session_id", "session_key"), "a room key")
        members = dm_members(conversation)
        if members is not None and (known.username not in members or self.user not in members):
            raise Refused(f"a room key for {conversation} from {known.username}, "
                          "who is not in it (or for a conversation we are not in)")
        try:
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(key))
        except ValueError:
            raise Refused("a room key that is not a Megolm session key") from None
        if session.session_id != session_id:
            raise Refused("a room key whose session id does not match its key")
        record = InboundRecord(session_id, conversation, known.username, known.device,
                               known.curve25519, known.ed25519, False,
                               session.first_known_index, "")
        self._keep_inbound(record, session)
        return session_id

    def _keep_inbound(self, record: InboundRecord, session: vodozemac.InboundGroupSession
                      ) -> None:
        old = self.store.inbound(record.session_id)
        if old is not None:
            if (old.conversation, old.sender, old.sender_device, old.sender_key) != (
                    record.conversation, record.sender, record.sender_device,
                    record.sender_key):
                raise Refused(f"a room key for session {record.session_id[:8]}... that "
                              "is already known from another sender or conversation")
            if old.first_index <= record.first_index:
                return  # what we hold already reads at least as far back
        self.store.save_inbound(record, session)

    def decrypt(self, frame: dict[str, Any]) -> Decrypted:
        """A `message` frame with `encrypted`: its text, or why not (yet)."""
        msg_id = frame.get("msg_id") if isinstance(frame.get("msg_id"), int) else None
        sender = str(frame.get("username", ""))
        try:
            return self._decrypt(frame, msg_id, sender)
        except Refused as refusal:
            return Decrypted(Status.REFUSED, msg_id, sender.lower(), None, reason=refusal.reason)

    def _decrypt(self, frame: dict[str, Any], msg_id: int | None, sender: str) -> Decrypted:
        envelope = frame.get("encrypted")
        if not isinstance(envelope, dict) or envelope.get("algorithm") != "megolm":
            raise Refused("not a Megolm message")
        device, sender_key, session_id, ciphertext = _strings(
            envelope, ("device", "sender_key", "session_id", "ciphertext"),
            "an encrypted message")
        conversation = conversation_of(frame)
        user = sender.lower()
        record = self.store.inbound(session_id)
        if record is None:
            # Said so that nobody waits for what cannot come: a key sent before this
            # device could read the conversation is never sent to it.
            reason = (f"no room key from {user}/{device} for it (yet): it comes if this device "
                      "was meant to read it; never if it was sent before this device "
                      "joined, or before you verified it from your other device")
            if msg_id is not None:
                with self.store.transaction():
                    self.store.add_pending(msg_id, session_id, frame, reason)
            return Decrypted(Status.PENDING, msg_id, user, device, reason=reason)
        if (record.sender, record.sender_device, record.sender_key) != (user, device, sender_key):
            raise Refused(f"a message under {record.sender}/{record.sender_device}'s session "
                          f"claims to be from {user}/{device}")
        if record.conversation != conversation:
            raise Refused(f"a message of {record.conversation} shown as one of {conversation}")
        known = self.store.device(user, device)
        if known is not None and known.state in ("changed", "blocked"):
            raise Refused(f"a message from {user}/{device}, whose device is {known.state}")
        session = self.store.load_inbound(vodozemac.InboundGroupSession, record)
        try:
            message = vodozemac.MegolmMessage.from_base64(ciphertext)
        except ValueError:
            raise Refused("a malformed Megolm message") from None
        if message.message_index() < session.first_known_index:
            reason = f"our key for this session starts after message {message.message_index()}"
            if msg_id is not None:
                with self.store.transaction():
                    self.store.add_pending(msg_id, session_id, frame, reason)
            return Decrypted(Status.PENDING, msg_id, user, device, reason=reason)
        try:
            decrypted = session.decrypt(message)
        except ValueError:
            raise Refused("a message that does not decrypt (altered or forged)") from None
        index = decrypted.message_index
        seen = self.store.seen_index(session_id, index)
        if seen is not None and seen != msg_id:
            raise Refused(f"a replay of message {seen} as message {msg_id}")
        text = check_plaintext(_json(decrypted.plaintext), conversation, frame)
        # Not synced to disk: a power cut that loses the newest replay records lets a
        # hostile server show those few messages again, while a sync per message would
        # make reading history five times slower (bench: decrypt).
        with self.store.transaction(durable=False):
            if msg_id is not None:
                self.store.record_index(session_id, index, msg_id)
                self.store.drop_pending(msg_id)
        own = (user, device) == (self.user, self.device)
        return Decrypted(Status.OK, msg_id, user, device, text,
                         verified=own or bool(known and known.verified))

    def pending_frames(self) -> list[dict[str, Any]]:
        """Every stored message frame not decrypted yet, oldest first."""
        return self.store.pending()

    # -- history for our own new devices --------------------------------------------

    def export_keys_for(self, device: str) -> Share:
        """Forward every room key we hold to another of our own devices, which must
        be verified: a device the server merely claims is ours gets nothing."""
        known = self.store.device(self.user, device)
        if known is None or not known.trusted or not known.verified:
            reason = "not verified" if known and known.trusted else (
                known.state if known else "unknown")
            return Share([], [], [(self.user, device, reason)])
        if not self.store.olm_sessions(vodozemac.Session, known.curve25519):
            return Share([], [(self.user, device)], [])
        messages = []
        with self.store.transaction():
            for record in self.store.inbound_sessions():
                session = self.store.load_inbound(vodozemac.InboundGroupSession, record)
                exported = session.export_at(session.first_known_index)
                if exported is None:
                    continue
                messages.append(self._encrypt_olm(known, FORWARDED_ROOM_KEY, {
                    "conversation": record.conversation, "session_id": record.session_id,
                    "session_key": exported.to_base64(), "sender": record.sender,
                    "sender_device": record.sender_device, "sender_key": record.sender_key,
                    "sender_ed25519": record.sender_ed25519}))
            requests = self._enqueue(messages)
        return Share(messages, [], [], requests)

    def _receive_forwarded(self, known: Device, content: dict[str, Any]) -> str:
        if known.username != self.user or not known.verified:
            raise Refused(f"forwarded room keys from {known.username}/{known.device}: "
                          "taken only from our own verified devices")
        conversation, session_id, key, sender, sender_device, sender_key, sender_ed = _strings(
            content, ("conversation", "session_id", "session_key", "sender", "sender_device",
                      "sender_key", "sender_ed25519"), "a forwarded room key")
        original = self.store.device(sender, sender_device)
        if original is not None and (original.curve25519, original.ed25519) != (
                sender_key, sender_ed):
            raise Refused(f"a forwarded key said to be from {sender}/{sender_device} "
                          "with other keys than that device's")
        try:
            session = vodozemac.InboundGroupSession.import_session(
                vodozemac.ExportedSessionKey(key))
        except ValueError:
            raise Refused("a forwarded room key that is not a Megolm key") from None
        if session.session_id != session_id:
            raise Refused("a forwarded room key whose session id does not match its key")
        self._keep_inbound(InboundRecord(
            session_id, conversation, sender.lower(), sender_device, sender_key,
            sender_ed, True, session.first_known_index, ""), session)
        return session_id

    # -- verification (SAS) ---------------------------------------------------------

    def start_verification(self, username: str, device: str) -> tuple[str, dict[str, Any]]:
        """Begin verifying another device: the transaction id and the queued request."""
        known = self._usable(username, device)
        txn = secrets.token_urlsafe(12)
        flow = Verification(txn, self._party(), _party(known), we_started=True)
        with self.store.transaction():
            (request,) = self._enqueue([self._encrypt_olm(known, "sas.start", flow.start())])
        self._verifications[txn] = flow
        return txn, request

    def verifications(self) -> dict[str, Target]:
        """The verifications in progress: transaction id -> the other device."""
        return {txn: (flow.their.username, flow.their.device)
                for txn, flow in self._verifications.items()}

    def verification_codes(self, txn: str) -> Codes:
        """The emoji or numbers to compare, once both keys are exchanged."""
        return self._flow(txn).codes()

    def confirm_verification(self, txn: str) -> tuple[dict[str, Any], bool]:
        """The user says the codes match: the queued request, and whether the other
        device is now verified (it is once its MAC, too, has come and matched)."""
        flow = self._flow(txn)
        with self.store.transaction():
            try:
                content = flow.confirm()
            except SasError as e:
                return self._cancel(flow, str(e)), False
            known = self._usable(flow.their.username, flow.their.device)
            (request,) = self._enqueue([self._encrypt_olm(known, "sas.mac", content)])
            return request, self._finish(flow)

    def cancel_verification(self, txn: str, reason: str = "cancelled by the user"
                            ) -> dict[str, Any]:
        """The codes differ, or the user gave up: the queued request."""
        with self.store.transaction():
            return self._cancel(self._flow(txn), reason)

    def _party(self) -> Party:
        return Party(self.user, self.device, self.ed25519)

    def _flow(self, txn: str) -> Verification:
        flow = self._verifications.get(txn)
        if flow is None:
            raise E2EError(f"no verification {txn!r}")
        return flow

    def _cancel(self, flow: Verification, reason: str) -> dict[str, Any]:
        self._verifications.pop(flow.txn, None)
        known = self._usable(flow.their.username, flow.their.device)
        (request,) = self._enqueue([self._encrypt_olm(known, "sas.cancel",
                                                      flow.cancel(reason))])
        return request

    def _finish(self, flow: Verification) -> bool:
        if not flow.verified:
            return False
        self.store.set_verified(flow.their.username, flow.their.device)
        self._verifications.pop(flow.txn, None)
        return True

    def _receive_sas(self, known: Device, kind: str, content: dict[str, Any]
                     ) -> tuple[list[dict[str, Any]], Target | None]:
        txn = content.get("txn")
        if not isinstance(txn, str) or not 1 <= len(txn) <= 64:
            raise Refused("a verification message without a transaction id")
        flow = self._verifications.get(txn)
        if kind == "sas.start":
            if flow is not None:
                raise Refused("a verification started twice")
            flow = self._verifications[txn] = Verification(txn, self._party(), _party(known),
                                                           we_started=False)
        elif flow is None:
            raise Refused(f"a {kind} for no verification in progress")
        elif (flow.their.username, flow.their.device) != (known.username, known.device):
            raise Refused(f"a {kind} from {known.username}/{known.device}, not from the "
                          "device being verified")
        if kind == "sas.cancel":
            self._verifications.pop(txn, None)
            flow.cancel(str(content.get("reason", "")))
            return [], None
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
            "sas.start": flow.on_start, "sas.accept": flow.on_accept,
            "sas.key": flow.on_key, "sas.mac": flow.on_mac}
        try:
            reply = handlers[kind](content)
        except SasError as e:
            self._verifications.pop(txn, None)
            cancel = self._encrypt_olm(known, "sas.cancel", flow.cancel(str(e)))
            # The cancel goes out with the refusal, queued in the same commit.
            raise _RefusedWithReply(f"verification failed: {e}", cancel) from None
        replies = [] if reply is None else [
            self._encrypt_olm(known, _NEXT[kind], reply)]
        verified = (known.username, known.device) if self._finish(flow) else None
        return replies, verified


_NEXT = {"sas.start": "sas.accept", "sas.accept": "sas.key", "sas.key": "sas.key"}


class _RefusedWithReply(Refused):
    def __init__(self, reason: str, reply: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reply = reply


def _party(device: Device) -> Party:
    return Party(device.username, device.device, device.ed25519)


def _group(key: str) -> str:
    return " ".join(key[i:i + 4] for i in range(0, len(key), 4))


def _verify(ed25519: str, signature: Any, signed: dict[str, Any], what: str) -> None:
    if not isinstance(signature, str):
        raise Refused(f"{what}: no signature")
    try:
        vodozemac.Ed25519PublicKey.from_base64(ed25519).verify_signature(
            canonical(signed), vodozemac.Ed25519Signature.from_base64(signature))
    except ValueError:
        raise Refused(f"{what}: the signature does not match the device's key") from None
