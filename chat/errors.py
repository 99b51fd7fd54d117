"""One exception tree for the whole service; each error knows its wire code.

    ChatError                     code: str, message: str
    ├── ProtocolError             the peer broke the framing or field rules (counted
    │   │                         towards the "10 errors in a row" limit)
    │   ├── BadFrame              bad_frame
    │   ├── FrameTooLarge         frame_too_large
    │   ├── UnknownType           unknown_type
    │   ├── InvalidField          invalid_field
    │   └── AuthRequired          auth_required
    └── RequestRefused            a well-formed request the server says no to
        ├── AlreadyAuthenticated, InvalidCredentials, InvalidUsername, WeakPassword,
        ├── UsernameTaken, NoSuchUser, NotInRoom, Forbidden, ServerBusy, Internal
        ├── NoSuchRoom, RoomTaken, Banned, LastOwner, Blocked      (v1.1: rooms)
        ├── RegistrationClosed, InvalidToken, AccountDisabled      (v1.1: accounts)
        └── RateLimited           carries retry_after (seconds)

Errors become wire `error` frames in exactly one place: `ChatError.to_frame`, called by
the connection's dispatcher.
"""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    code = "internal"
    default_message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def to_frame(self, re: Any = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if re is not None:
            frame["re"] = re
        return frame


class ProtocolError(ChatError):
    """The peer broke a framing or field rule; several in a row end the connection."""

    # The decoded frame, when there was one (a JSON object without a `type`, say).
    frame: dict[str, Any] | None = None


class BadFrame(ProtocolError):
    code = "bad_frame"
    default_message = "frame is not a UTF-8 JSON object"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"
    default_message = "frame exceeds max_frame_bytes"


class UnknownType(ProtocolError):
    code = "unknown_type"
    default_message = "unknown frame type"


class InvalidField(ProtocolError):
    code = "invalid_field"
    default_message = "a field is missing or invalid"


class AuthRequired(ProtocolError):
    code = "auth_required"
    default_message = "log in first"


class RequestRefused(ChatError):
    """A well-formed request that the server refuses; not a protocol error."""


class AlreadyAuthenticated(RequestRefused):
    code = "already_authenticated"
    default_message = "this connection is already logged in"


class InvalidCredentials(RequestRefused):
    code = "invalid_credentials"
    default_message = "invalid username or password"


class InvalidUsername(RequestRefused):
    code = "invalid_username"
    default_message = "usernames are 3 to 32 characters: letters, digits, '_', '.', '-'"


class WeakPassword(RequestRefused):
    code = "weak_password"
    default_message = "password is too weak"


class UsernameTaken(RequestRefused):
    code = "username_taken"
    default_message = "that username is taken"


class NoSuchUser(RequestRefused):
    code = "no_such_user"
    default_message = "no such user"


class NotInRoom(RequestRefused):
    code = "not_in_room"
    default_message = "you are not in that room"


class Forbidden(RequestRefused):
    code = "forbidden"
    default_message = "that is not allowed"


class NoSuchRoom(RequestRefused):
    code = "no_such_room"
    # One text for a room that does not exist and a private one the asker may not see.
    default_message = "no such room"


class RoomTaken(RequestRefused):
    code = "room_taken"
    default_message = "a room by that name exists"


class Banned(RequestRefused):
    code = "banned"
    default_message = "banned from that room"


class LastOwner(RequestRefused):
    code = "last_owner"
    default_message = "a room with members keeps at least one owner: make another first"


class Blocked(RequestRefused):
    code = "blocked"
    default_message = "that user does not take this from you"


class RegistrationClosed(RequestRefused):
    code = "registration_closed"
    default_message = "registration is closed on this server"


class InvalidToken(RequestRefused):
    code = "invalid_token"
    # One text for unknown, expired, used-up and revoked tokens.
    default_message = "that registration token is not valid"


class AccountDisabled(RequestRefused):
    code = "account_disabled"
    default_message = "this account is disabled"


class ServerBusy(RequestRefused):
    code = "server_busy"
    default_message = "server is busy, try again shortly"


class Internal(RequestRefused):
    code = "internal"
    default_message = "internal server error"


class RateLimited(RequestRefused):
    code = "rate_limited"
    default_message = "too many requests"

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        super().__init__(message)
        # Whole seconds, never 0, so a client that sleeps retry_after does not spin.
        self.retry_after = max(1, int(retry_after + 0.999))

    def to_frame(self, re: Any = None) -> dict[str, Any]:
        frame = super().to_frame(re)
        frame["retry_after"] = self.retry_after
        return frame


ERROR_CODES = frozenset(
    cls.code
    for cls in (
        BadFrame, FrameTooLarge, UnknownType, InvalidField, AuthRequired,
        AlreadyAuthenticated, InvalidCredentials, InvalidUsername, WeakPassword,
        UsernameTaken, NoSuchUser, NotInRoom, Forbidden, ServerBusy, Internal, RateLimited,
        NoSuchRoom, RoomTaken, Banned, LastOwner, Blocked, RegistrationClosed, InvalidToken,
        AccountDisabled,
    )
)
