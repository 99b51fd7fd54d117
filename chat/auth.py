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
import itertools
import logging
import os
import re
import secrets
import string
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
        raise ValueError(f"pepper file {path} holds more than hex digits") from None
    if len(pepper) < 16:
        raise ValueError(f"pepper file {path} holds {len(pepper)} bytes; a pepper needs at "
                         "least 16 random bytes, hex-encoded")
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


# Keyboard walks: a password that is one stretch of one of these (forwards or backwards,
# possibly going round again) is typed by sliding a finger along the keys.
_KEYBOARD_WALKS = (
    "1234567890",
    "!@#$%^&*()",
    "qwertyuiop",
    "asdfghjkl",
    "zxcvbnm",
    "qwertyuiopasdfghjklzxcvbnm",
    "poiuytrewqlkjhgfdsamnbvcxz",
    "1234567890qwertyuiopasdfghjklzxcvbnm",
    "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik,9ol.0p;/",
    "qazwsxedcrfvtgbyhnujmikolp",
)
_MIN_DISTINCT = 5
_MIN_LIST_WORD = 4  # shorter list entries ('a', '12', 'abc') would split anything
_MAX_LIST_WORDS = 2
_EDGES = re.compile(r"^[\W\d_]+|[\W\d_]+$")  # digits, punctuation and spaces at the ends
_NOT_ALNUM = re.compile(r"[\W_]+")


@cache
def _list_words() -> tuple[frozenset[str], int]:
    """The common-password entries long enough to count as words, and the longest's length."""
    words = frozenset(w for w in common_passwords() if len(w) >= _MIN_LIST_WORD)
    return words, max(map(len, words))


def _period(text: str) -> int | None:
    """The length of the unit if `text` is a shorter piece said twice or more (the last
    copy may be cut short: 'abcabcab'), else None."""
    for size in range(1, len(text) // 2 + 1):
        if text[size:] == text[:-size]:
            return size
    return None


def _step(a: str, b: str) -> int:
    # Digits and letters wrap round, so '8901' and 'yzab' keep the same step.
    if a in string.digits and b in string.digits:
        return (ord(b) - ord(a)) % 10
    if a in string.ascii_lowercase and b in string.ascii_lowercase:
        return (ord(b) - ord(a)) % 26
    return ord(b) - ord(a)


def _is_one_or_two_runs(text: str) -> bool:
    """True if `text` is at most two runs of characters with a constant step ('abcdef',
    '97531', 'zyxw', '1234abcd', 'aaaabcde')."""
    n = len(text)
    if n < 3:
        return False
    steps = [_step(a, b) for a, b in itertools.pairwise(text)]
    # run[i]: how many characters from i on form one constant-step run.
    run = [1] * n
    run[n - 2] = 2
    for i in range(n - 3, -1, -1):
        run[i] = run[i + 1] + 1 if steps[i] == steps[i + 1] else 2
    return run[0] >= n or any(run[k] >= n - k for k in range(1, run[0] + 1))


def _is_keyboard_walk(text: str) -> bool:
    for walk in _KEYBOARD_WALKS:
        for line in (walk, walk[::-1]):
            if text in line * (len(text) // len(line) + 2):
                return True
    return False


def _common_words_needed(text: str) -> int | None:
    """The fewest common-list words (at most _MAX_LIST_WORDS) that `text` is made of."""
    words, longest = _list_words()
    n = len(text)
    if n < _MIN_LIST_WORD:
        return None
    # fewest[i]: fewest words that make text[:i]; a split-point scan with set lookups.
    fewest: list[int | None] = [0] + [None] * n
    for start in range(n):
        before = fewest[start]
        if before is None or before >= _MAX_LIST_WORDS:
            continue
        for end in range(start + _MIN_LIST_WORD, min(n, start + longest) + 1):
            after = fewest[end]
            if (after is None or after > before + 1) and text[start:end] in words:
                fewest[end] = before + 1
    return fewest[n]


def _compound_of_common(lowered: str) -> str | None:
    """Why the password is common-list words in disguise, or None: once spaces go and
    digits and symbols are cut from the ends, it is one or two entries joined
    ('dragonmonkey123'), or one entry said over and over ('password password!')."""
    spaceless = "".join(lowered.split())
    for joined in (spaceless, _NOT_ALNUM.sub("", spaceless)):
        core = _EDGES.sub("", joined)
        size = _period(core)
        repeated = size is not None and len(core) % size == 0
        count = _common_words_needed(core[:size] if repeated else core)
        if count is None:
            continue
        if repeated:
            return "that password is a common password repeated"
        if count == 1:
            return "that password is a common password with only digits or symbols added"
        return f"that password is {count} common passwords joined together"
    return None


def check_new_password(
    password: str, username: str, *, min_length: int, service_name: str = "chat"
) -> str:
    """Return the normalised password, or raise WeakPassword saying why.

    Besides length, the checks follow NIST SP 800-63B-4 section 3.1.1.2's blocklist: the
    username and the service's name, the common-password list (alone, padded, or two
    entries joined), repetition and sequences. There are no composition rules.
    """
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
    service = service_name.casefold()
    if service in lowered and lowered.replace(service, "").strip("0123456789!. ") == "":
        raise WeakPassword("the password must not be built from the service's name")
    spaceless = "".join(lowered.split())
    if _period(lowered) is not None or _period(spaceless) is not None:
        raise WeakPassword("the password must not be one short piece repeated")
    if len(set(spaceless)) < _MIN_DISTINCT:
        raise WeakPassword(
            f"the password needs at least {_MIN_DISTINCT} different characters")
    if _is_one_or_two_runs(spaceless):
        raise WeakPassword(
            "the password must not be a run of characters in order, like 'abcd' or '1234'")
    if _is_keyboard_walk(spaceless):
        raise WeakPassword(
            "the password must not be a row of keys on the keyboard, like 'qwerty'")
    reason = _compound_of_common(lowered)
    if reason is not None:
        raise WeakPassword(reason)
    return normal


# Unicode TS #39's confusables (confusables.txt) that stay inside the username alphabet
# [A-Za-z0-9_.-]: 0 is O, 1 and I are l, m is rn. Names are unique regardless of case, so
# the comparison is too: in lower case, i joins 1 and l (as its capital I looks like l).
_CONFUSABLE = str.maketrans({"0": "o", "1": "l", "i": "l", ".": None, "_": None, "-": None})


def username_skeleton(name: str) -> str:
    """What a username looks like, for refusing look-alikes of an existing one.

    TS #39's skeleton over our ASCII alphabet, compared without case, and without the
    separators `.`, `_` and `-` (our choice: `alice.` or `al_ice` pass for `alice` at a
    glance). Two names with one skeleton cannot both be registered.
    """
    return name.lower().translate(_CONFUSABLE).replace("m", "rn")

