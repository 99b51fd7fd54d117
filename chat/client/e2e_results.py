"""What the end-to-end machine (crypto.py) answers: its one exception tree and its
frozen results. Every result says what to do next; none is dropped silently.

    E2EError        the caller asked for something that cannot be done now (encrypt
                    before prepare, a device with no Olm session): a bug or a state to fix
    └── Refused     something received is not believed; `reason` is shown as a warning
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

Target = tuple[str, str]  # (username, device)


class E2EError(Exception):
    """Something the caller asked for cannot be done (a programming or state error)."""


class Refused(E2EError):
    """Something received is refused: the UI shows `reason` as a warning."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Status(enum.Enum):
    OK = "ok"
    PENDING = "pending"  # cannot decrypt yet; kept, retried when the key (or device) comes
    REFUSED = "refused"  # a warning to show; never displayed as the sender's message
    DUPLICATE = "duplicate"  # a to-device message handled before (the server resent it)


@dataclass(frozen=True, slots=True)
class Decrypted:
    """What `decrypt` made of a message frame."""
    status: Status
    msg_id: int | None
    sender: str | None = None
    device: str | None = None
    text: str | None = None
    reason: str = ""
    verified: bool = False  # the sending device was verified (SAS) when it was decrypted


@dataclass(frozen=True, slots=True)
class ToDeviceResult:
    """What a to-device frame did. Acknowledge up to `ack` once this is returned (it is
    None when nothing was committed: query `needs_keys`, then hand the frame in again)."""
    seq: int
    status: Status
    ack: int | None
    kind: str | None = None
    sender: str | None = None
    device: str | None = None
    reason: str = ""
    needs_keys: str | None = None
    replies: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # replies, queued
    decryptable: list[dict[str, Any]] = field(default_factory=list)
    verified: Target | None = None


@dataclass(frozen=True, slots=True)
class Share:
    """To-device entries (`messages`), already queued in the outbox as `requests` (the
    `to_device` requests to send, each within a frame), devices that need an Olm session
    first (`claim_key` each, `receive_claimed`, then ask again), and devices left out
    with the reason."""
    messages: list[dict[str, Any]]
    need_sessions: list[Target]
    skipped: list[tuple[str, str, str]]
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeviceNotice:
    """A change in someone's devices. `loud` ones are possible attacks."""
    username: str
    device: str
    kind: str  # new_device | changed_key | removed | bad_signature
    loud: bool
    text: str
