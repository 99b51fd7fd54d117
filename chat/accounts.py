"""Registration tokens, and the account states only the operator changes.

A token is 256 random bits in URL-safe base64, shown once when made; the database keeps
only its SHA-256 (a token is a random secret, not a password: a fast hash is enough, and
a lookup by hash needs no secret comparison). Each has a number of uses, an expiry and
may be revoked. Consuming one is a single UPDATE that succeeds only while a use is left,
inside the registration's own savepoint: of 50 registrations racing for a one-use token,
one account is made, and a registration refused later (a taken name) gives its use back.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import Connection, and_, insert, select, update

from chat.errors import InvalidToken
from chat.models import RegistrationToken

tokens_t = RegistrationToken.__table__

TOKEN_BYTES = 32
DEFAULT_TOKEN_TTL = 7 * 24 * 3600.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(db: Connection, uses: int, ttl_s: float, note: str, now_ms: int
                 ) -> tuple[int, str]:
    """A new token: its id, and the token itself (never stored, never shown again)."""
    if uses < 1:
        raise ValueError("a token needs at least one use")
    if not ttl_s > 0:
        raise ValueError("a token needs a positive lifetime")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    while token.startswith("-"):  # `--token -x...` would read as an option on a command line
        token = secrets.token_urlsafe(TOKEN_BYTES)
    tid = db.execute(insert(tokens_t).values(
        token_hash=token_hash(token), uses_allowed=uses, uses=0, created_ms=now_ms,
        expires_ms=now_ms + int(ttl_s * 1000), revoked_ms=None, note=note,
    )).inserted_primary_key[0]
    return tid, token


def _usable(now_ms: int) -> Any:
    c = tokens_t.c
    return and_(c.revoked_ms.is_(None), c.expires_ms > now_ms, c.uses < c.uses_allowed)


def token_usable(db: Connection, token: str, now_ms: int) -> bool:
    """A look before the bcrypt work (which a token that cannot be used should not cost)."""
    return db.execute(select(tokens_t.c.id).where(and_(
        tokens_t.c.token_hash == token_hash(token), _usable(now_ms)))).first() is not None


def consume_token(db: Connection, token: str, now_ms: int) -> int:
    """Use the token once, or raise InvalidToken (one answer for unknown, expired, used up
    and revoked). The condition is in the UPDATE itself, so no two uses can share one."""
    c = tokens_t.c
    row = db.execute(update(tokens_t).where(and_(c.token_hash == token_hash(token),
                                                 _usable(now_ms)))
                     .values(uses=c.uses + 1).returning(c.id)).first()
    if row is None:
        raise InvalidToken()
    return row[0]


def list_tokens(db: Connection, now_ms: int) -> list[dict[str, Any]]:
    rows = db.execute(select(tokens_t).order_by(tokens_t.c.id)).all()
    out = []
    for r in rows:
        state = ("revoked" if r.revoked_ms is not None else "expired" if r.expires_ms <= now_ms
                 else "used up" if r.uses >= r.uses_allowed else "usable")
        out.append({"id": r.id, "uses": r.uses, "uses_allowed": r.uses_allowed,
                    "created_ms": r.created_ms, "expires_ms": r.expires_ms,
                    "revoked_ms": r.revoked_ms, "note": r.note, "state": state})
    return out


def revoke_token(db: Connection, token_id: int, now_ms: int) -> bool:
    """Revoke a token by id; False if there is none by that id (or it was revoked)."""
    c = tokens_t.c
    done = db.execute(update(tokens_t).where(and_(c.id == token_id, c.revoked_ms.is_(None)))
                      .values(revoked_ms=now_ms))
    return done.rowcount == 1
