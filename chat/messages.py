"""Client requests as frozen, self-validating types: an invalid request cannot exist.

`parse_request(frame)` turns a decoded frame dict into one of the request classes below,
or raises `UnknownType` / `InvalidField`. Field rules from the protocol live here; rules
that need server state or settings (password strength, whether a user exists) live in
`chat.auth` and the connection's handlers.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from chat import devices
from chat.errors import InvalidField, UnknownType

MAX_ID_CHARS = 64
# Integers outside JavaScript's safe range would not survive a round trip through many
# JSON parsers, so an integer id must fit in 53 bits.
MAX_SAFE_INT = 2**53 - 1
MAX_MESSAGE_CHARS = 4000
# v1.1 field rules: a topic is one line; a reason may be empty.
MAX_TOPIC_CHARS = 300
MAX_REASON_CHARS = 300
# A registration token as `chat-admin token create` makes them (43 characters), with room
# for another tool's.
MAX_TOKEN_CHARS = 128
MAX_PASSWORD_CHARS = 256
DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 200

USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}\Z")
ROOM_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
# C0 controls except \t and \n, DEL, and C1 controls: these could drive a peer's terminal.
_FORBIDDEN_IN_MESSAGE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A topic or a reason is one line: no control character at all.
_FORBIDDEN_IN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

RequestId = str | int | None


def _is_int(value: Any) -> bool:
    # bool is a subclass of int in Python, but true/false are not integers on the wire.
    return isinstance(value, int) and not isinstance(value, bool)


def _encodable(text: str) -> bool:
    # json.loads happily produces lone surrogates from "\ud800"; they cannot be stored
    # or sent on as UTF-8, so they are refused at the door.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def request_id(frame: dict[str, Any]) -> RequestId:
    """The frame's `id`, validated. An invalid id is reported without `re`."""
    rid = frame.get("id")
    if rid is None:
        return None
    if _is_int(rid):
        if -MAX_SAFE_INT <= rid <= MAX_SAFE_INT:
            return rid
        raise InvalidField("id: integers must fit in 53 bits")
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS and _encodable(rid):
        return rid
    raise InvalidField(f"id: a string of at most {MAX_ID_CHARS} characters, or an integer")


def _string(frame: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = frame.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _encodable(value):
        raise InvalidField(f"{name}: a string is required")
    return value


def room_name(value: Any, field: str = "room") -> str:
    """Validate a room name and return its canonical (lower-case) form."""
    if not isinstance(value, str) or not ROOM_RE.match(value):
        raise InvalidField(f"{field}: 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value.lower()


def valid_username(value: str) -> bool:
    return bool(USERNAME_RE.match(value))


def message_text(value: Any) -> str:
    if not isinstance(value, str) or not _encodable(value):
        raise InvalidField("message: a string is required")
    if not 1 <= len(value) <= MAX_MESSAGE_CHARS:
        raise InvalidField(f"message: 1 to {MAX_MESSAGE_CHARS} characters")
    if _FORBIDDEN_IN_MESSAGE.search(value):
        raise InvalidField("message: control characters other than newline and tab")
    if not value.strip():
        raise InvalidField("message: must not be only white space")
    return value


def line_text(value: Any, field: str, max_chars: int) -> str:
    """A topic or a reason: one line of at most `max_chars`, possibly empty."""
    if value is None:
        return ""
    if not isinstance(value, str) or not _encodable(value):
        raise InvalidField(f"{field}: a string is required")
    if len(value) > max_chars:
        raise InvalidField(f"{field}: at most {max_chars} characters")
    if _FORBIDDEN_IN_LINE.search(value):
        raise InvalidField(f"{field}: one line, without control characters")
    return value.strip()


def normalize_password(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def _optional_int(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_SAFE_INT:
        raise InvalidField(f"{name}: a non-negative integer is required")
    return value


class _Secret(str):
    """A str whose repr never shows its value, so passwords stay out of logs and tracebacks."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Register(Request):
    username: str
    password: str
    token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "password", _Secret(self.password))


@dataclass(frozen=True, slots=True)
class Login(Request):
    username: str
    password: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "password", _Secret(self.password))


@dataclass(frozen=True, slots=True)
class Ping(Request):
    pass


@dataclass(frozen=True, slots=True)
class Pong(Request):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Request):
    pass


@dataclass(frozen=True, slots=True)
class Send(Request):
    room: str | None  # canonical room name, or None for a direct message
    to: str | None  # recipient username as typed, or None for a room message
    message: str  # the text; for an encrypted message, ENCRYPTED_PLACEHOLDER
    # An encrypted message's Megolm envelope (chat.devices.parse_envelope), else None.
    encrypted: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Join(Request):
    room: str


@dataclass(frozen=True, slots=True)
class Leave(Request):
    room: str


@dataclass(frozen=True, slots=True)
class Who(Request):
    room: str


@dataclass(frozen=True, slots=True)
class History(Request):
    room: str | None
    with_: str | None
    before: int | None
    after: int | None
    limit: int
    # Every direct message to or from the requester (neither room nor with_).
    direct: bool = False


@dataclass(frozen=True, slots=True)
class Passwd(Request):
    old: str
    new: str
    logout_others: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "old", _Secret(self.old))
        object.__setattr__(self, "new", _Secret(self.new))


# --- v1.1: rooms with access control -----------------------------------------------
VISIBILITIES = ("public", "private")
HISTORIES = ("shared", "joined")
ROLES = ("owner", "moderator", "member")


@dataclass(frozen=True, slots=True)
class Create(Request):
    room: str
    visibility: str
    history: str
    encrypted: bool = False


@dataclass(frozen=True, slots=True)
class Invite(Request):
    room: str
    username: str


@dataclass(frozen=True, slots=True)
class Kick(Request):
    room: str
    username: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ban(Request):
    room: str
    username: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unban(Request):
    room: str
    username: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetRole(Request):
    room: str
    username: str
    role: str


@dataclass(frozen=True, slots=True)
class Topic(Request):
    room: str
    topic: str


@dataclass(frozen=True, slots=True)
class SetHistory(Request):
    room: str
    history: str


@dataclass(frozen=True, slots=True)
class RoomInfo(Request):
    room: str


@dataclass(frozen=True, slots=True)
class Members(Request):
    room: str


@dataclass(frozen=True, slots=True)
class ListRooms(Request):
    pass


@dataclass(frozen=True, slots=True)
class BlockUser(Request):
    username: str


@dataclass(frozen=True, slots=True)
class UnblockUser(Request):
    username: str


# --- end-to-end encryption, step 1: the device directory (chat.devices) -------------
MAX_QUERIED_USERS = 100
# What a `message` frame carries as text for an encrypted message, so that a client that
# cannot decrypt shows something; the server never has the text.
ENCRYPTED_PLACEHOLDER = "[encrypted]"
# A ciphertext's own bound; a frame (max_frame_bytes) is the tighter one in practice.
MAX_CIPHERTEXT_CHARS = 1 << 20


@dataclass(frozen=True, slots=True)
class UploadDevice(Request):
    keys: devices.DeviceKeys  # fields checked; the signature by the handler (needs the user)


@dataclass(frozen=True, slots=True)
class UploadOneTimeKeys(Request):
    device: str
    keys: tuple[devices.OneTimeKey, ...]
    fallback: devices.OneTimeKey | None


@dataclass(frozen=True, slots=True)
class QueryKeys(Request):
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClaimKey(Request):
    username: str
    device: str


@dataclass(frozen=True, slots=True)
class ToDeviceItem:
    username: str  # as typed
    device: str
    olm: dict[str, Any]  # chat.devices.parse_olm


@dataclass(frozen=True, slots=True)
class ToDevice(Request):
    send_id: str
    messages: tuple[ToDeviceItem, ...]


@dataclass(frozen=True, slots=True)
class ToDeviceAck(Request):
    upto: int


def _parse_to_device(rid: RequestId, frame: dict[str, Any]) -> Request:
    send_id = frame.get("send_id")
    if not isinstance(send_id, str) or not devices.SEND_ID_RE.match(send_id):
        raise InvalidField("send_id: 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")
    items = frame.get("messages")
    if not isinstance(items, list) or not items:
        raise InvalidField("messages: a list of at least one message is required")
    parsed = []
    for item in items:
        item = devices.only(item, {"username", "device", "olm"}, "messages")
        username = item.get("username")
        if not isinstance(username, str) or not _encodable(username):
            raise InvalidField("messages: username: a string is required")
        parsed.append(ToDeviceItem(username, devices.device_id(item.get("device")),
                                   devices.parse_olm(item.get("olm"), MAX_CIPHERTEXT_CHARS)))
    return ToDevice(rid, send_id, tuple(parsed))


def _parse_to_device_ack(rid: RequestId, frame: dict[str, Any]) -> Request:
    upto = _optional_int(frame, "upto")
    if upto is None:
        raise InvalidField("upto: a non-negative integer is required")
    return ToDeviceAck(rid, upto)


def _parse_one_time_keys(rid: RequestId, frame: dict[str, Any]) -> Request:
    keys = frame.get("keys", [])
    if not isinstance(keys, list):
        raise InvalidField("keys: a list is required")
    fallback = frame.get("fallback")
    return UploadOneTimeKeys(
        rid, devices.device_id(frame.get("device")),
        tuple(devices.parse_one_time_key(k) for k in keys),
        devices.parse_one_time_key(fallback, fallback=True) if fallback is not None else None)


def _parse_query_keys(rid: RequestId, frame: dict[str, Any]) -> Request:
    users = frame.get("users")
    if (not isinstance(users, list) or not 1 <= len(users) <= MAX_QUERIED_USERS
            or not all(isinstance(u, str) and _encodable(u) for u in users)):
        raise InvalidField(f"users: a list of 1 to {MAX_QUERIED_USERS} usernames")
    return QueryKeys(rid, tuple(dict.fromkeys(users)))


def _parse_upload_device(rid: RequestId, frame: dict[str, Any]) -> Request:
    return UploadDevice(rid, devices.parse_device(frame))


def _choice(frame: dict[str, Any], name: str, choices: tuple[str, ...],
            default: str | None = None) -> str:
    value = frame.get(name, default)
    if value not in choices:
        raise InvalidField(f"{name}: one of {', '.join(choices)}")
    return value


def _username(frame: dict[str, Any]) -> str:
    """A username field as typed (the store finds it regardless of case)."""
    value = _string(frame, "username")
    assert value is not None
    return value


def _device(value: Any) -> str:
    return devices.device_id(value)


def _parse_create(rid: RequestId, frame: dict[str, Any]) -> Request:
    visibility = _choice(frame, "visibility", VISIBILITIES, "public")
    history = _choice(frame, "history", HISTORIES,
                      "joined" if visibility == "private" else "shared")
    encrypted = frame.get("encrypted", False)
    if not isinstance(encrypted, bool):
        raise InvalidField("encrypted: true or false")
    if encrypted and visibility != "private":
        raise InvalidField("encrypted: only a private room can be encrypted")
    return Create(rid, room_name(frame.get("room")), visibility, history, encrypted)


def _parse_removal(cls: type) -> Any:
    def parse(rid: RequestId, frame: dict[str, Any]) -> Request:
        return cls(rid, room_name(frame.get("room")), _username(frame),
                   line_text(frame.get("reason"), "reason", MAX_REASON_CHARS))
    return parse


def _parse_topic(rid: RequestId, frame: dict[str, Any]) -> Request:
    if not isinstance(frame.get("topic"), str):  # "" clears it; a missing one is a mistake
        raise InvalidField("topic: a string is required (\"\" clears the topic)")
    return Topic(rid, room_name(frame.get("room")),
                 line_text(frame["topic"], "topic", MAX_TOPIC_CHARS))


def _credentials(frame: dict[str, Any]) -> tuple[str, str]:
    username = _string(frame, "username")
    password = _string(frame, "password")
    assert username is not None and password is not None
    # Bound the work bcrypt's pre-hash and NFKC do; the strength rules come later.
    if len(password) > 4 * MAX_PASSWORD_CHARS:
        raise InvalidField("password: too long")
    return username, _Secret(password)


def _parse_register(rid: RequestId, frame: dict[str, Any]) -> Request:
    token = _string(frame, "token", required=False)
    if token is not None and len(token) > MAX_TOKEN_CHARS:
        raise InvalidField(f"token: at most {MAX_TOKEN_CHARS} characters")
    return Register(rid, *_credentials(frame), token)


def _parse_login(rid: RequestId, frame: dict[str, Any]) -> Request:
    return Login(rid, *_credentials(frame))


def _parse_send(rid: RequestId, frame: dict[str, Any]) -> Request:
    has_room, has_to = frame.get("room") is not None, frame.get("to") is not None
    if has_room == has_to:
        raise InvalidField("send: exactly one of 'room' or 'to' is required")
    envelope = frame.get("encrypted")
    if envelope is not None:
        if frame.get("message") is not None:
            raise InvalidField("send: 'message' or 'encrypted', not both")
        envelope = devices.parse_envelope(envelope, MAX_CIPHERTEXT_CHARS)
        text = ENCRYPTED_PLACEHOLDER
    else:
        text = message_text(frame.get("message"))
    if has_room:
        return Send(rid, room_name(frame["room"]), None, text, envelope)
    to = _string(frame, "to")
    return Send(rid, None, to, text, envelope)


def _parse_history(rid: RequestId, frame: dict[str, Any]) -> Request:
    has_room, has_with = frame.get("room") is not None, frame.get("with") is not None
    direct = frame.get("direct", False)
    if not isinstance(direct, bool):
        raise InvalidField("direct: true or false")
    if has_room + has_with + direct != 1:
        raise InvalidField("history: exactly one of 'room', 'with' or 'direct' is required")
    before, after = _optional_int(frame, "before"), _optional_int(frame, "after")
    if before is not None and after is not None:
        raise InvalidField("history: 'before' and 'after' cannot be combined")
    limit = frame.get("limit", DEFAULT_HISTORY_LIMIT)
    if not _is_int(limit) or limit < 1:
        raise InvalidField("limit: a positive integer is required")
    limit = min(limit, MAX_HISTORY_LIMIT)
    room = room_name(frame["room"]) if has_room else None
    with_ = _string(frame, "with") if has_with else None
    return History(rid, room, with_, before, after, limit, direct)


def _parse_passwd(rid: RequestId, frame: dict[str, Any]) -> Request:
    old, new = _string(frame, "old"), _string(frame, "new")
    assert old is not None and new is not None
    if len(old) > 4 * MAX_PASSWORD_CHARS or len(new) > 4 * MAX_PASSWORD_CHARS:
        raise InvalidField("password: too long")
    logout_others = frame.get("logout_others", False)
    if not isinstance(logout_others, bool):
        raise InvalidField("logout_others: true or false")
    return Passwd(rid, _Secret(old), _Secret(new), logout_others)


_PARSERS = {
    "register": _parse_register,
    "login": _parse_login,
    "ping": lambda rid, frame: Ping(rid),
    "pong": lambda rid, frame: Pong(rid),
    "quit": lambda rid, frame: Quit(rid),
    "send": _parse_send,
    "join": lambda rid, frame: Join(rid, room_name(frame.get("room"))),
    "leave": lambda rid, frame: Leave(rid, room_name(frame.get("room"))),
    "who": lambda rid, frame: Who(rid, room_name(frame.get("room"))),
    "history": _parse_history,
    "passwd": _parse_passwd,
    "create": _parse_create,
    "invite": lambda rid, frame: Invite(rid, room_name(frame.get("room")), _username(frame)),
    "kick": _parse_removal(Kick),
    "ban": _parse_removal(Ban),
    "unban": _parse_removal(Unban),
    "set_role": lambda rid, frame: SetRole(rid, room_name(frame.get("room")), _username(frame),
                                           _choice(frame, "role", ROLES)),
    "topic": _parse_topic,
    "set_history": lambda rid, frame: SetHistory(rid, room_name(frame.get("room")),
                                                 _choice(frame, "history", HISTORIES)),
    "room_info": lambda rid, frame: RoomInfo(rid, room_name(frame.get("room"))),
    "members": lambda rid, frame: Members(rid, room_name(frame.get("room"))),
    "list_rooms": lambda rid, frame: ListRooms(rid),
    "block": lambda rid, frame: BlockUser(rid, _username(frame)),
    "device_keys": _parse_upload_device,
    "one_time_keys": _parse_one_time_keys,
    "query_keys": _parse_query_keys,
    "claim_key": lambda rid, frame: ClaimKey(rid, _username(frame),
                                             _device(frame.get("device"))),
    "unblock": lambda rid, frame: UnblockUser(rid, _username(frame)),
    "to_device": _parse_to_device,
    "to_device_ack": _parse_to_device_ack,
}


def parse_request(frame: dict[str, Any], rid: RequestId = None) -> Request:
    """Build the typed request for a decoded frame (whose `id` was checked by request_id)."""
    parser = _PARSERS.get(frame["type"])
    if parser is None:
        raise UnknownType(f"unknown frame type {frame['type'][:40]!r}")
    return parser(rid, frame)
