"""Password hashing and password/username rules.

Hashing follows the OWASP Password Storage Cheat Sheet's pre-hashing recipe: the NFKC form
of the password is keyed through HMAC-SHA-256 with a server secret (the pepper, kept outside
the database), base64-encoded (44 bytes, under bcrypt's 72-byte limit, so nothing is ever
truncated), then hashed with bcrypt. A stored hash reads

    hmac-sha256+bcrypt$<pepper id>$<bcrypt hash>

where the pepper id is a short fingerprint of the pepper, so a rotated pepper (or a raised
cost) can be recognised and the hash upgraded at the user's next login.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

import bcrypt

from chat.errors import WeakPassword
from chat.messages import MAX_PASSWORD_CHARS, normalize_password

log = logging.getLogger(__name__)

SCHEME = "hmac-sha256+bcrypt"
PEPPER_BYTES = 32


def load_or_create_pepper(path: Path) -> bytes:
    """Read the pepper, or make a new random one with mode 0600 if the file is missing."""
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = secrets.token_hex(PEPPER_BYTES)
        # O_EXCL: two servers starting at once must not each write a different pepper.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_pepper(path)
        with os.fdopen(fd, "w") as fh:
            fh.write(raw + "\n")
        log.warning("created a new password pepper in %s: back it up; without it no "
                    "stored password can be checked", path)
    return _parse_pepper(raw, path)


def read_pepper(path: Path) -> bytes:
    """Read an existing pepper file (a retired one, say); never creates one."""
    return _parse_pepper(path.read_text().strip(), path)


def _parse_pepper(raw: str, path: Path) -> bytes:
    try:
        pepper = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"{path}: a pepper file holds hex digits only") from None
    if len(pepper) < 16:
        raise ValueError(f"{path}: the pepper must hold at least 16 random bytes, hex-encoded")
    return pepper


def pepper_id(pepper: bytes) -> str:
    # A fingerprint, not the secret: it only tells which pepper made a hash.
    return hashlib.sha256(b"chat pepper id:" + pepper).hexdigest()[:12]


class PasswordHasher:
    """Hashes and checks passwords; safe to share between threads (it holds no state).

    `previous` peppers still check old hashes after a rotation; `needs_rehash` then says
    the hash should be remade with the current pepper at the user's next login.
    """

    def __init__(self, pepper: bytes, rounds: int = 12, previous: Sequence[bytes] = ()) -> None:
        self.rounds = rounds
        self.pepper_id = pepper_id(pepper)
        self._peppers = {pepper_id(p): p for p in previous}
        self._peppers[self.pepper_id] = pepper
        # A real hash of a random secret: checking a login for an unknown user against it
        # costs exactly the bcrypt work of a real check, so timing reveals nothing.
        self._dummy = self.hash(secrets.token_urlsafe(24))

    def __repr__(self) -> str:
        return f"PasswordHasher(rounds={self.rounds}, pepper_id={self.pepper_id!r})"

    def _prehash(self, password: str, pepper: bytes) -> bytes:
        mac = hmac.new(pepper, normalize_password(password).encode("utf-8"), "sha256")
        return base64.b64encode(mac.digest())

    def hash(self, password: str) -> str:
        prehash = self._prehash(password, self._peppers[self.pepper_id])
        digest = bcrypt.hashpw(prehash, bcrypt.gensalt(self.rounds))
        return f"{SCHEME}${self.pepper_id}${digest.decode('ascii')}"

    def verify(self, password: str, stored: str | None) -> bool:
        """True if the password matches; an absent or foreign hash costs a dummy check."""
        scheme, _, rest = (stored or "").partition("$")
        pid, _, digest = rest.partition("$")
        pepper = self._peppers.get(pid) if scheme == SCHEME else None
        real = pepper is not None and digest.startswith("$2")
        if not real:
            # Unknown user, or a pepper we no longer have: spend the same work anyway.
            _, _, rest = self._dummy.partition("$")
            pid, _, digest = rest.partition("$")
            pepper = self._peppers[pid]
        assert pepper is not None
        try:
            ok = bcrypt.checkpw(self._prehash(password, pepper), digest.encode("ascii"))
        except ValueError:  # a corrupt stored hash
            return False
        return ok and real

    def needs_rehash(self, stored: str) -> bool:
        parts = stored.split("$", 2)
        if len(parts) != 3 or parts[0] != SCHEME or parts[1] != self.pepper_id:
            return True
        # bcrypt hashes read $2b$<cost>$...
        try:
            cost = int(parts[2].split("$")[2])
        except (IndexError, ValueError):
            return True
        return cost != self.rounds


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list (Django's 20,000 common passwords; see data/common-passwords.LICENSE)."""
    data = resources.files("chat").joinpath("data/common-passwords.txt.gz").read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(data).decode().splitlines())


def check_new_password(
    password: str, username: str, *, min_length: int, service_name: str = "chat"
) -> str:
    """Return the normalised password, or raise WeakPassword saying why."""
    normal = normalize_password(password)
    if len(normal) < min_length:
        raise WeakPassword(f"passwords need at least {min_length} characters")
    if len(normal) > MAX_PASSWORD_CHARS:
        raise WeakPassword(f"passwords may have at most {MAX_PASSWORD_CHARS} characters")
    lowered = normal.casefold()
    if username.casefold() in lowered:
        raise WeakPassword("the password must not contain the username")
    if lowered in common_passwords() or lowered.strip() in common_passwords():
        raise WeakPassword("that password is on the list of common passwords")
    # The service's own name padded with digits or repeated is a classic first guess.
    if lowered.replace(service_name.casefold(), "").strip("0123456789!. ") == "":
        raise WeakPassword("the password must not be built from the service's name")
    return normal
