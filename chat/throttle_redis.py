"""The login and registration throttles of a cluster, kept in Redis so every node counts alike.

Theory of operation
-------------------
`RedisThrottle` has `Throttle`'s interface and semantics (chat/throttle.py), but its tables
are Redis keys under `<redis_prefix>:throttle:`, one per account or address and kind. Each
operation is one Lua script: atomic across nodes, one round trip. Every key it writes gets
a TTL (the window; an account's delay plus the idle horizon; the in-flight bound), so
Redis forgets idle entries by itself and nothing needs pruning.

Time is the calling node's wall clock, passed into each script, not Redis' `TIME`: the
tests drive it with a fake clock as they drive `Throttle`'s, and the nodes' clocks are
trusted already (they stamp messages); NTP keeps them milliseconds apart, far below the
shortest delay, one second. A clock stepped back lengthens a wait by the step, no more.

An admitted login is a member, named by a random token, of its account's and its
address's pending sets; this node keeps the token per (address, account) until the
attempt settles. A member older than PENDING_TTL no longer counts: a node that died in
the middle of a check, or whose settle Redis never heard, holds no account hostage.

When a Redis call fails (refused, timed out, any RedisError), that call and every one
after it go to `fallback`, a node-local `Throttle` with the same limits: logins and
registrations keep working, and each node limits on its own, so an attacker gains at most
one quota per node while it lasts. Until a probe, every RETRY_INTERVAL and in the
background, finds Redis answering again, no call waits on it: `check_login` and
`register_attempt` run on a connection's I/O thread, where one timeout stalls every
connection of that loop. The outage is logged when it starts and when it ends; every
failed call calls `on_error` (the server counts `chat_redis_errors`). Counts made during
an outage stay on their node; they are not copied into Redis when it is back.

A settle goes where its admission went, so pending counts never leak: an attempt the
fallback admitted settles in the fallback; one Redis admitted settles in Redis, or, if
Redis fails meanwhile, nowhere (its pending members expire, and its outcome is lost with
the few others in flight at the outage, while the fallback starts counting from nothing
anyway). Registrations have no pending count; the fallback's are remembered by (address,
time) so that a refusal gives them back there.

Threads: any thread may call. One lock guards this node's bookkeeping and is never held
across a Redis call; the redis-py client is thread-safe. Not for Redis Cluster: a login's
keys are an account's and an address's, which no hash tag can put in one slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from chat.errors import RateLimited
from chat.throttle import (
    ACCOUNT_KEY_CHARS,
    LOGIN_LIMITED,
    REGISTRATION_LIMITED,
    Limits,
    Throttle,
)

log = logging.getLogger(__name__)

# Connect and read timeout of a throttle call, seconds. Redis on the cluster's network
# answers in a fraction of a millisecond; one that has not answered in this long is
# treated as down, and the call is decided by the node alone.
REDIS_TIMEOUT = 0.5
# Seconds between probes of a Redis that failed: how long a recovered Redis may go unused,
# and how often a dead one costs a (background) connection attempt.
RETRY_INTERVAL = 5.0
# Seconds after which an admitted login still unsettled stops counting as in flight. A
# check is a queue wait and a bcrypt hash, seconds at worst; and the connection has
# `login_timeout` (30 s) to log in at all.
PENDING_TTL = 60.0

# Shared by every script: ARGV[1] the limits (JSON), ARGV[2] the node's clock.
_PRELUDE = """
local lim = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])
local function num(x)  -- as a string Redis parses back to the same double
  return string.format('%.17g', x)
end
local function recent(key, span)  -- Throttle._recent: forget what is span old, count the rest
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - span))
  return redis.call('ZCARD', key)
end
local function oldest(key)
  return tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
end
local function delay(consecutive)  -- Limits.account_delay
  if consecutive >= lim.max_consecutive then return lim.lockout end
  return math.min(lim.max_delay, 2 ^ math.max(0, consecutive - lim.account_failures))
end
"""

# The login scripts' KEYS: the account's state (a hash: consecutive, last), its failures,
# its pending attempts, the address's failures, its pending attempts. ARGV[3]: the
# attempt's token, '' for none.
_CHECK_LOGIN = _PRELUDE + """
local wait = 0
local consecutive = tonumber(redis.call('HGET', KEYS[1], 'consecutive')) or 0
local failures = recent(KEYS[2], lim.window)
local pending = recent(KEYS[3], lim.pending_ttl)
if failures >= lim.account_failures or consecutive >= lim.max_consecutive then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last')) or now
  wait = last + delay(consecutive) - now
elseif failures + pending >= lim.account_failures then
  wait = 1  -- the attempts in flight may use up what is left
end
failures = recent(KEYS[4], lim.window)
pending = recent(KEYS[5], lim.pending_ttl)
if failures >= lim.ip_failures then
  wait = math.max(wait, oldest(KEYS[4]) + lim.window - now)
elseif failures + pending >= lim.ip_failures then
  wait = math.max(wait, 1)
end
if wait > 0 then return num(wait) end
for _, key in ipairs({KEYS[3], KEYS[5]}) do
  redis.call('ZADD', key, ARGV[2], ARGV[3])
  redis.call('EXPIRE', key, math.ceil(lim.pending_ttl))
end
return '0'
"""

# ARGV[4]: this failure's id.
_LOGIN_FAILED = _PRELUDE + """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[5], ARGV[3])
end
local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
redis.call('HSET', KEYS[1], 'last', ARGV[2])
for _, key in ipairs({KEYS[2], KEYS[4]}) do
  recent(key, lim.window)
  redis.call('ZADD', key, ARGV[2], ARGV[4])
end
-- A horizon past the account's delay: whoever comes back as it ends still finds the
-- count, and the doubling goes on from there, as Throttle's lazy pruning allows.
local ttl = math.ceil(delay(consecutive) + lim.horizon)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[4], math.ceil(lim.window) + 1)
"""

_LOGIN_SUCCEEDED = _PRELUDE + """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[5], ARGV[3]) end
"""

_RELEASE = _PRELUDE + """
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[5], ARGV[3])
"""

# KEYS[1]: the address's registrations. ARGV[3]: this registration's id.
_REGISTER = _PRELUDE + """
if recent(KEYS[1], lim.registration_window) >= lim.registrations_per_ip then
  return num(oldest(KEYS[1]) + lim.registration_window - now)
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(lim.registration_window) + 1)
return '0'
"""

# ARGV[2]: the time the registration was counted at. One entry of that time, as
# Throttle's: another node's of the very same time would be the same to the limit.
_REGISTRATION_RELEASED = _PRELUDE + """
local taken = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[2], 'LIMIT', 0, 1)
if taken[1] then redis.call('ZREM', KEYS[1], taken[1]) end
"""


def connect(url: str) -> redis.Redis:
    """A client for the throttles: short timeouts, and no retries, since a failed call
    is decided by the node at once."""
    return redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT,
                                socket_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0))


def _in_a_thread(probe: Callable[[], None]) -> None:
    threading.Thread(target=probe, name="redis-probe", daemon=True).start()


class RedisThrottle:
    """`Throttle` for a cluster; see the module's theory of operation."""

    def __init__(
        self, limits: Limits, client: redis.Redis, prefix: str,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[], object] | None = None,
        background: Callable[[Callable[[], None]], object] = _in_a_thread,
    ) -> None:
        """`clock` must be a wall clock every node shares (never time.monotonic);
        `background` runs the probe (the tests run it at once, on the caller's thread)."""
        self.limits = limits
        self.fallback = Throttle(limits, clock)
        self._client = client
        self._keys = f"{prefix}:throttle:"
        self._clock = clock
        self._on_error = on_error or (lambda: None)
        self._background = background
        self._limits = json.dumps({**dataclasses.asdict(limits), "horizon": limits.horizon,
                                   "pending_ttl": PENDING_TTL})
        self._check_login = client.register_script(_CHECK_LOGIN)
        self._login_failed = client.register_script(_LOGIN_FAILED)
        self._login_succeeded = client.register_script(_LOGIN_SUCCEEDED)
        self._release = client.register_script(_RELEASE)
        self._register = client.register_script(_REGISTER)
        self._registration_released = client.register_script(_REGISTRATION_RELEASED)
        self._lock = threading.Lock()
        # (address, account) -> the tokens of its attempts admitted here and not settled
        # yet, oldest first; "" for one the fallback admitted. Any one settles any other:
        # they differ in nothing but where they are counted.
        self._in_flight: dict[tuple[str, str], list[str]] = {}
        # (address, time) of the registrations the fallback counted, oldest first, and
        # how many at that time: a refusal gives them back there.
        self._fallback_registrations: dict[tuple[str, float], int] = {}
        self._down = False
        self._retry_at = 0.0
        self._probing = False

    # --- logins ---------------------------------------------------------------------
    def check_login(self, ip: str, account: str) -> None:
        """Admit one attempt or raise RateLimited; call before any bcrypt work.

        An admitted attempt must be settled by exactly one of `login_failed`,
        `login_succeeded` or `release`.
        """
        account = account[:ACCOUNT_KEY_CHARS]
        if self._redis_up():
            token = secrets.token_hex(8)
            try:
                wait = float(self._check_login(
                    keys=self._login_keys(ip, account),
                    args=[self._limits, self._clock(), token]))
            except RedisError as exc:
                self._failed(exc)
            else:
                if wait > 0:
                    raise RateLimited(wait, LOGIN_LIMITED)
                self._admitted(ip, account, token)
                return
        self.fallback.check_login(ip, account)
        self._admitted(ip, account, "")

    def login_failed(self, ip: str, account: str) -> None:
        account = account[:ACCOUNT_KEY_CHARS]
        token = self._settling(ip, account)
        if token != "" and self._redis_up():
            try:
                self._login_failed(keys=self._login_keys(ip, account),
                                   args=[self._limits, self._clock(), token or "",
                                         secrets.token_hex(8)])
                return
            except RedisError as exc:
                self._failed(exc)
        if not token:  # the fallback's, or nobody's: the fallback is the one left to count it
            self.fallback.login_failed(ip, account)

    def login_succeeded(self, ip: str, account: str) -> None:
        account = account[:ACCOUNT_KEY_CHARS]
        token = self._settling(ip, account)
        if token != "" and self._redis_up():
            try:
                self._login_succeeded(keys=self._login_keys(ip, account),
                                      args=[self._limits, self._clock(), token or ""])
                return
            except RedisError as exc:
                self._failed(exc)
        if not token:
            self.fallback.login_succeeded(ip, account)

    def release(self, ip: str, account: str) -> None:
        """Settle an admitted attempt that never got to check a password."""
        account = account[:ACCOUNT_KEY_CHARS]
        token = self._settling(ip, account)
        if token == "":
            self.fallback.release(ip, account)
        elif token is not None and self._redis_up():
            try:
                self._release(keys=self._login_keys(ip, account),
                              args=[self._limits, self._clock(), token])
            except RedisError as exc:
                self._failed(exc)

    def _login_keys(self, ip: str, account: str) -> list[str]:
        k = self._keys
        # The account as a digest: a password typed into the username field must not
        # sit in Redis in the clear for a day.
        a = hashlib.sha256(account.encode()).hexdigest()[:32]
        return [f"{k}account:{a}", f"{k}account-failures:{a}",
                f"{k}account-pending:{a}", f"{k}address-failures:{ip}",
                f"{k}address-pending:{ip}"]

    def _admitted(self, ip: str, account: str, token: str) -> None:
        with self._lock:
            self._in_flight.setdefault((ip, account), []).append(token)

    def _settling(self, ip: str, account: str) -> str | None:
        """The token of one attempt admitted here for (ip, account), now settled; None
        if there was none (a caller settling what it never checked)."""
        with self._lock:
            tokens = self._in_flight.get((ip, account))
            if not tokens:
                return None
            token = tokens.pop(0)
            if not tokens:
                del self._in_flight[(ip, account)]
            return token

    # --- registrations --------------------------------------------------------------
    def register_attempt(self, ip: str) -> float:
        """Count one registration from ip, or raise RateLimited if it is over its limit.

        Returns the time it was counted at, for `registration_released`.
        """
        if self._redis_up():
            now = self._clock()
            try:
                wait = float(self._register(keys=[self._registration_key(ip)],
                                            args=[self._limits, now, secrets.token_hex(8)]))
            except RedisError as exc:
                self._failed(exc)
            else:
                if wait > 0:
                    raise RateLimited(wait, REGISTRATION_LIMITED)
                return now
        counted_at = self.fallback.register_attempt(ip)
        with self._lock:
            mine = self._fallback_registrations
            # Past its window an entry is gone from the fallback too: nothing to give back.
            while mine:
                oldest = next(iter(mine))
                if oldest[1] > counted_at - self.limits.registration_window:
                    break
                del mine[oldest]
            mine[(ip, counted_at)] = mine.get((ip, counted_at), 0) + 1
        return counted_at

    def registration_released(self, ip: str, counted_at: float) -> None:
        """Give back a registration that the server refused before doing its bcrypt work."""
        with self._lock:
            mine = self._fallback_registrations
            local = mine.get((ip, counted_at), 0)
            if local > 1:
                mine[(ip, counted_at)] = local - 1
            elif local:
                del mine[(ip, counted_at)]
        if local:
            self.fallback.registration_released(ip, counted_at)
        elif self._redis_up():
            # Redis' while it is down: kept, and counted until its window ends.
            try:
                self._registration_released(keys=[self._registration_key(ip)],
                                            args=[self._limits, counted_at])
            except RedisError as exc:
                self._failed(exc)

    def _registration_key(self, ip: str) -> str:
        return f"{self._keys}registrations:{ip}"

    # --- Redis up and down ----------------------------------------------------------
    def _redis_up(self) -> bool:
        """Whether to ask Redis; when it is down and a probe is due, start one."""
        with self._lock:
            if not self._down:
                return True
            if self._probing or self._clock() < self._retry_at:
                return False
            self._probing = True
        self._background(self._probe)
        with self._lock:
            return not self._down  # a probe run at once may have found it

    def _failed(self, exc: RedisError) -> None:
        self._on_error()
        with self._lock:
            started = not self._down
            self._down = True
            self._retry_at = self._clock() + RETRY_INTERVAL
        if started:
            log.warning("Redis failed (%s: %s): each node limits logins and registrations "
                        "on its own until it is back", type(exc).__name__, exc)

    def _probe(self) -> None:
        answered = False
        try:
            # A write, as the scripts make: a replica or a full Redis refuses it as them.
            self._client.set(f"{self._keys}probe", b"1", px=int(RETRY_INTERVAL * 1000))
            answered = True
        except RedisError:
            self._on_error()
        finally:
            with self._lock:
                self._probing = False
                if answered:
                    self._down = False
                else:
                    self._retry_at = self._clock() + RETRY_INTERVAL
        if answered:
            log.warning("Redis answers again: login and registration limits are counted "
                        "across the cluster again")
