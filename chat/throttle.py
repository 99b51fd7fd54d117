"""Throttling of password guessing and registration spam; sans-IO, with an injected clock.

Theory of operation
-------------------
Login failures are counted per account and per client IP in a sliding window. Once an
account has `account_failures` failures inside the window, each further attempt must wait
a delay that doubles with every consecutive failure (1 s, 2 s, 4 s, ... up to
`max_delay`), counted from the last failure; the right password is refused too while the
delay runs, or the limit would tell the attacker when a guess was right. A success resets
the account. The per-IP count slows one address spraying one password over many
accounts. Registrations are counted per IP; one the server refuses before its bcrypt work
(`server_busy`, shutting down, an internal error) is given back.

Checks happen before any bcrypt work. One lock guards the tables; every operation is a
few dictionary steps. Idle entries are pruned as the tables grow, so memory stays bounded
by the number of addresses and accounts active within one window. An "IP" here is the
key the caller passes: the server passes `address_key(ip, ...)`, so an IPv6 /64 is one.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from chat.errors import RateLimited

# Prune idle entries each time a table has grown by this many since the last prune.
_PRUNE_EVERY = 1024
# An account name is counted by its first this many characters: the name as typed in a
# login is the client's to choose, and a key must not grow with it.
ACCOUNT_KEY_CHARS = 64

# The refusals' words, shared with the cluster's throttle (chat.throttle_redis).
LOGIN_LIMITED = "too many failed logins; wait before trying again"
REGISTRATION_LIMITED = "too many registrations from this address"


def address_key(ip: str, v6_prefix: int) -> str:
    """What every per-address limit counts `ip` under.

    An IPv4 address is itself. An IPv6 address counts as its /`v6_prefix` network: one
    host, or one household, is usually given a whole /64, so counting full addresses
    would hand it 2**64 quotas. An IPv4-mapped IPv6 address (::ffff:192.0.2.1, from a
    dual-stack socket) is the IPv4 address it maps. Anything else (a zone suffix aside)
    is returned as it is.
    """
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])  # a zone is not part of the host
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, v6_prefix), strict=False))
    return str(addr)


@dataclass
class _Record:
    times: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    last: float = 0.0
    # Attempts admitted whose bcrypt check has not finished: they count against the
    # limit already, so parallel connections cannot all slip in before the first fails.
    pending: int = 0


@dataclass(frozen=True)
class Limits:
    window: float = 900.0
    account_failures: int = 5
    ip_failures: int = 50
    max_delay: float = 900.0
    registrations_per_ip: int = 5
    registration_window: float = 3600.0
    max_consecutive: int = 100
    lockout: float = 86400.0

    def account_delay(self, consecutive: int) -> float:
        if consecutive >= self.max_consecutive:
            return self.lockout
        return min(self.max_delay, 2.0 ** max(0, consecutive - self.account_failures))

    @property
    def horizon(self) -> float:
        """How long an idle entry may still matter; an account's own delay may be longer."""
        return max(self.window, self.registration_window, self.max_delay)


class Throttle:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, _Record] = {}
        self._ips: dict[str, _Record] = {}
        self._registrations: dict[str, _Record] = {}
        self._grown = 0

    # --- logins ---------------------------------------------------------------------
    def check_login(self, ip: str, account: str) -> None:
        """Admit one attempt or raise RateLimited; call before any bcrypt work.

        An admitted attempt must be settled by exactly one of `login_failed`,
        `login_succeeded` or `release`.
        """
        now = self._clock()
        lim = self.limits
        account = account[:ACCOUNT_KEY_CHARS]
        with self._lock:
            wait = 0.0
            rec = self._accounts.get(account)
            if rec is not None:
                recent = self._recent(rec, now, lim.window)
                if recent >= lim.account_failures or rec.consecutive >= lim.max_consecutive:
                    wait = rec.last + lim.account_delay(rec.consecutive) - now
                elif recent + rec.pending >= lim.account_failures:
                    wait = 1.0  # the attempts in flight may use up what is left
            ip_rec = self._ips.get(ip)
            if ip_rec is not None:
                recent = self._recent(ip_rec, now, lim.window)
                if recent >= lim.ip_failures:
                    wait = max(wait, ip_rec.times[0] + lim.window - now)
                elif recent + ip_rec.pending >= lim.ip_failures:
                    wait = max(wait, 1.0)
            if wait > 0:
                raise RateLimited(wait, LOGIN_LIMITED)
            self._record(self._accounts, account).pending += 1
            self._record(self._ips, ip).pending += 1

    def login_failed(self, ip: str, account: str) -> None:
        now = self._clock()
        account = account[:ACCOUNT_KEY_CHARS]
        with self._lock:
            for table, key in ((self._accounts, account), (self._ips, ip)):
                rec = self._record(table, key)
                rec.pending = max(0, rec.pending - 1)
                rec.times.append(now)
                rec.consecutive += 1
                rec.last = now

    def login_succeeded(self, ip: str, account: str) -> None:
        with self._lock:
            self._accounts.pop(account[:ACCOUNT_KEY_CHARS], None)
            self._settle(self._ips, ip)

    def release(self, ip: str, account: str) -> None:
        """Settle an admitted attempt that never got to check a password."""
        with self._lock:
            self._settle(self._accounts, account[:ACCOUNT_KEY_CHARS])
            self._settle(self._ips, ip)

    def _settle(self, table: dict[str, _Record], key: str) -> None:
        rec = table.get(key)
        if rec is not None:
            rec.pending = max(0, rec.pending - 1)

    # --- registrations --------------------------------------------------------------
    def register_attempt(self, ip: str) -> float:
        """Count one registration from ip, or raise RateLimited if it is over its limit.

        Returns the time it was counted at, for `registration_released`.
        """
        now = self._clock()
        lim = self.limits
        with self._lock:
            rec = self._record(self._registrations, ip)
            if self._recent(rec, now, lim.registration_window) >= lim.registrations_per_ip:
                wait = rec.times[0] + lim.registration_window - now
                raise RateLimited(wait, REGISTRATION_LIMITED)
            rec.times.append(now)
            rec.last = now
            return now

    def registration_released(self, ip: str, counted_at: float) -> None:
        """Give back a registration that the server refused before doing its bcrypt work."""
        with self._lock:
            rec = self._registrations.get(ip)
            if rec is not None and counted_at in rec.times:
                # That very entry, not the newest: the others keep their own expiry.
                rec.times.remove(counted_at)

    # --- bookkeeping (lock held) ----------------------------------------------------
    @staticmethod
    def _recent(rec: _Record, now: float, window: float) -> int:
        while rec.times and rec.times[0] <= now - window:
            rec.times.popleft()
        return len(rec.times)

    def _record(self, table: dict[str, _Record], key: str) -> _Record:
        rec = table.get(key)
        if rec is None:
            self._grown += 1
            if self._grown >= _PRUNE_EVERY:
                self._grown = 0
                self._prune(self._clock())  # before the new record, which it must keep
            rec = table[key] = _Record(last=self._clock())
        return rec

    def _prune(self, now: float) -> None:
        lim = self.limits
        horizon = lim.horizon
        for table in (self._ips, self._registrations):
            for key in [k for k, r in table.items()
                        if r.last < now - horizon and not r.pending]:
                del table[key]
        # An account is forgotten only once its own delay has long run out.
        for key in [k for k, r in self._accounts.items()
                    if r.last < now - max(horizon, lim.account_delay(r.consecutive))
                    and not r.pending]:
            del self._accounts[key]


class TokenBucket:
    """A rate with a burst: `rate` tokens a second, at most `burst` saved up.

    Frames spend one token each; reply bytes spend what the reply weighs, and may run the
    bucket into debt, which must be paid off before the connection's next request. Used
    by one connection's loop thread only, so it needs no lock.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def wait(self, need: float = 1.0) -> float:
        """Seconds until `need` tokens are there (0.0: now), spending nothing."""
        tokens = self._refill()
        return 0.0 if tokens >= need else (need - tokens) / self.rate

    def ready(self, need: float = 1.0) -> float:
        """As `wait`, but without reading the clock while the tokens are there anyway.

        Tokens accrue from the last refill whenever it next happens, so skipping the
        refill loses nothing but accrual past the burst, which is capped away regardless.
        This is the per-frame path: one attribute read instead of a clock read.
        """
        if self._tokens >= need:
            return 0.0
        return self.wait(need)

    def spend(self, amount: float) -> None:
        """Take `amount` tokens, into debt if need be; a negative amount gives back."""
        self._tokens = min(self.burst, self._tokens - amount)

    def take(self) -> float:
        """Spend one token if there is one; return 0.0, or the seconds until there is."""
        wait = self.wait(1.0)
        if not wait:
            self._tokens -= 1.0
        return wait
