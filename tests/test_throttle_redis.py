"""The cluster's throttle (chat.throttle_redis): nodes on one Redis share every count; a
node that cannot reach Redis counts on its own, and shares again once Redis is back.

The behaviours a single throttle must have run against both kinds in test_throttle.py.
Each "node" here is a RedisThrottle with a client of its own, all on the test's private
redis-server and one cluster prefix; the clock is a fake, and a probe of a Redis that
failed runs at once on the caller's thread, so nothing waits on time.
"""

from __future__ import annotations

import logging

import pytest
import redis
import redistest
from conftest import PASSWORD

from chat.errors import RateLimited
from chat.throttle import Limits
from chat.throttle_redis import PENDING_TTL, RETRY_INTERVAL, RedisThrottle

pytestmark = pytest.mark.redis

IP, OTHER_IP = "192.0.2.1", "192.0.2.2"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0  # a wall clock's time, as the nodes pass in

    def __call__(self) -> float:
        return self.now


class Link(redis.Redis):
    """A node's client whose link to Redis the test can cut (`cut = True`): one node cut
    off while Redis and the other nodes go on, keeping what Redis holds. `calls` counts
    the commands the node tried to send."""

    cut = False
    calls = 0

    def execute_command(self, *args, **options):
        self.calls += 1
        if self.cut:
            raise redis.exceptions.ConnectionError("cut off by the test")
        return super().execute_command(*args, **options)


def at_once(probe) -> None:
    probe()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(redis_server, clock):
    """node(limits) -> one more node of the test's cluster; `.link` is its client and
    `.errors` how often it called on_error."""
    prefix = redistest.unique_prefix()
    links: list[Link] = []

    def make(limits: Limits) -> RedisThrottle:
        link = Link.from_url(redis_server.url)
        links.append(link)
        errors: list[None] = []
        t = RedisThrottle(limits, link, prefix, clock, on_error=lambda: errors.append(None),
                          background=at_once)
        t.link, t.errors, t.prefix = link, errors, prefix  # type: ignore[attr-defined]
        return t

    yield make
    for link in links:
        link.close()


def attempt_failed(t: RedisThrottle, account: str = "alice", ip: str = IP) -> None:
    t.check_login(ip, account)
    t.login_failed(ip, account)


def refused(t: RedisThrottle, account: str = "alice", ip: str = IP) -> int:
    with pytest.raises(RateLimited) as exc:
        t.check_login(ip, account)
    return exc.value.retry_after


def nothing_in_flight(*nodes: RedisThrottle) -> None:
    """No node holds an unsettled attempt, in its own books or in its fallback's."""
    for t in nodes:
        assert t._in_flight == {}
        tables = (t.fallback._accounts, t.fallback._ips)
        assert all(rec.pending == 0 for table in tables for rec in table.values())


# --- nodes share the counts -----------------------------------------------------------


def test_a_throttle_hit_on_one_node_holds_on_another(node, clock):
    one, two = node(Limits(account_failures=3)), node(Limits(account_failures=3))
    for _ in range(3):
        attempt_failed(one)
    assert refused(two) == 1  # the right password too: it is not checked at all
    assert refused(two, ip=OTHER_IP) == 1  # another address does not escape it
    two.check_login(IP, "bob")  # other accounts are unaffected
    two.release(IP, "bob")
    clock.now += 1
    two.check_login(IP, "alice")  # the delay is over: one attempt, and it succeeds
    two.login_succeeded(IP, "alice")
    for _ in range(2):
        attempt_failed(one)  # reset on the other node: the count starts again
    one.check_login(IP, "alice")
    one.release(IP, "alice")
    nothing_in_flight(one, two)


def test_password_spraying_is_counted_across_nodes(node):
    limits = Limits(account_failures=5, ip_failures=4)
    one, two = node(limits), node(limits)
    for i in range(4):
        attempt_failed((one, two)[i % 2], account=f"user{i}")
    for t in (one, two):
        assert refused(t, account="user99") > 1  # until the oldest failure leaves the window
    two.check_login(OTHER_IP, "user99")
    two.release(OTHER_IP, "user99")


def test_attempts_in_flight_on_one_node_count_on_another(node):
    one, two = node(Limits(account_failures=2)), node(Limits(account_failures=2))
    one.check_login(IP, "alice")
    one.check_login(OTHER_IP, "alice")
    assert refused(two) == 1
    one.release(OTHER_IP, "alice")
    two.check_login(IP, "alice")
    one.login_failed(IP, "alice")
    two.login_failed(IP, "alice")
    assert refused(one) == refused(two) == 1  # two failures: the doubling has begun
    nothing_in_flight(one, two)


def test_an_attempt_whose_node_died_stops_counting_after_a_while(node, clock):
    one, two = node(Limits(account_failures=1)), node(Limits(account_failures=1))
    one.check_login(IP, "alice")  # and the node dies before it settles
    assert refused(two) == 1
    clock.now += PENDING_TTL
    two.check_login(IP, "alice")


def test_registrations_are_counted_across_nodes(node, clock):
    limits = Limits(registrations_per_ip=3, registration_window=3600)
    one, two = node(limits), node(limits)
    one.register_attempt(IP)
    clock.now += 10
    counted_at = two.register_attempt(IP)
    one.register_attempt(IP)
    with pytest.raises(RateLimited) as exc:
        two.register_attempt(IP)
    assert exc.value.retry_after == 3600 - 10
    two.registration_released(IP, counted_at)  # refused before its bcrypt work
    one.register_attempt(IP)
    with pytest.raises(RateLimited):
        one.register_attempt(IP)
    two.register_attempt(OTHER_IP)
    clock.now += 3600 - 10
    two.register_attempt(IP)  # the first has left the window


def test_redis_forgets_idle_entries_by_itself(node, redis_server, clock):
    limits = Limits(account_failures=2, max_consecutive=4, lockout=86400)
    one = node(limits)
    for _ in range(4):
        attempt_failed(one)  # locked out: the longest-lived account entry
        clock.now += 86400
    one.check_login(OTHER_IP, "bob")  # in flight
    one.register_attempt(IP)
    admin = redis_server.client()
    longest = {"account": 86400 + limits.horizon, "account-failures": 86400 + limits.horizon,
               "address-failures": limits.window, "account-pending": PENDING_TTL,
               "address-pending": PENDING_TTL, "registrations": limits.registration_window}
    keys = [k.decode() for k in admin.scan_iter("*")]
    assert sorted(k.split(":")[-2] for k in keys) == sorted(longest)
    for key in keys:
        assert key.startswith(f"{one.prefix}:throttle:")
        assert 0 < admin.ttl(key) <= longest[key.split(":")[-2]] + 1, key
    admin.close()


def test_two_clusters_on_one_redis_keep_their_own_counts(node, redis_server, clock):
    one = node(Limits(account_failures=1))
    other = RedisThrottle(Limits(account_failures=1), one.link, "another-cluster", clock)
    attempt_failed(one)
    other.check_login(IP, "alice")
    other.release(IP, "alice")


# --- Redis down -----------------------------------------------------------------------


def test_with_redis_stopped_each_node_limits_on_its_own(node, redis_server, clock, caplog):
    limits = Limits(account_failures=2, registrations_per_ip=1)
    one, two = node(limits), node(limits)
    attempt_failed(one, "carol")  # counted in Redis, which is about to lose it
    redis_server.stop()
    caplog.set_level(logging.WARNING, "chat.throttle_redis")
    # Logins keep working and are limited, each node on its own.
    for _ in range(2):
        attempt_failed(one)
    assert refused(one) == 1
    attempt_failed(two)
    two.check_login(IP, "alice")  # the other node has counted one failure only
    two.login_succeeded(IP, "alice")
    one.check_login(IP, "bob")  # a right password elsewhere: in, and nothing else changes
    one.login_succeeded(IP, "bob")
    # So do registrations.
    one.register_attempt(IP)
    with pytest.raises(RateLimited):
        one.register_attempt(IP)
    two.register_attempt(IP)
    # Each node said so once, and counted its failed calls: one each, as nothing asks a
    # Redis that failed until its probe is due.
    failed = [r for r in caplog.records if "Redis failed" in r.getMessage()]
    assert len(failed) == 2
    assert one.errors == two.errors == [None]
    # Back: the probe, once due, finds it, and the nodes count together again.
    redis_server.start()
    caplog.clear()
    clock.now += RETRY_INTERVAL
    for _ in range(2):
        attempt_failed(one, "dave")
    assert refused(two, "dave") == 1
    attempt_failed(two, "carol")  # what Redis lost on the way is lost: a fresh count
    one.check_login(IP, "carol")
    one.release(IP, "carol")
    assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 2
    nothing_in_flight(one, two)


def test_a_node_cut_off_asks_redis_again_only_when_its_probe_is_due(node, clock):
    one = node(Limits())
    one.link.cut = True
    one.check_login(IP, "alice")  # the first call finds Redis gone
    tried = one.link.calls
    for _ in range(5):
        one.release(IP, "alice")
        one.check_login(IP, "alice")
        one.register_attempt(IP)
    assert one.link.calls == tried  # the others did not try it
    one.release(IP, "alice")
    clock.now += RETRY_INTERVAL
    one.check_login(IP, "bob")  # due: the probe tries, and fails
    one.release(IP, "bob")
    assert one.link.calls == tried + 1 and len(one.errors) == 2
    one.link.cut = False
    clock.now += RETRY_INTERVAL
    one.check_login(IP, "bob")  # the probe, then the check, in Redis
    assert one.link.calls >= tried + 3 and len(one.errors) == 2
    one.release(IP, "bob")
    nothing_in_flight(one)


def test_settles_go_where_their_admissions_went_across_an_outage(node, clock):
    # One node loses its link (Redis keeps what it holds) between two admissions, and gets
    # it back before they settle: each settles where it was counted, so nothing stays
    # pending in Redis or in the node, and the other node sees what Redis saw.
    one, two = node(Limits(account_failures=2)), node(Limits(account_failures=2))
    one.check_login(IP, "alice")  # by Redis
    one.link.cut = True
    one.check_login(IP, "alice")  # by the fallback
    one.register_attempt(IP)  # the fallback's too
    one.link.cut = False
    clock.now += RETRY_INTERVAL
    one.check_login(IP, "alice")  # by Redis again
    one.login_failed(IP, "alice")
    one.release(IP, "alice")
    one.release(IP, "alice")
    nothing_in_flight(one)
    assert not one.link.exists(f"{one.prefix}:throttle:account-pending:alice")
    assert not one.link.exists(f"{one.prefix}:throttle:address-pending:{IP}")
    # Redis holds one failure and nothing pending: the other node admits one more attempt.
    two.check_login(IP, "alice")
    assert refused(two) == 1
    two.release(IP, "alice")
    # The fallback's registration is given back to the fallback.
    assert one.fallback._registrations[IP].times
    one.registration_released(IP, clock.now - RETRY_INTERVAL)
    assert not one.fallback._registrations[IP].times


def test_a_settle_redis_never_hears_of_leaks_nothing_for_long(node, clock):
    one, two = node(Limits(account_failures=1)), node(Limits(account_failures=1))
    one.check_login(IP, "alice")
    one.link.cut = True
    one.release(IP, "alice")  # lost on the way
    nothing_in_flight(one)
    assert refused(two) == 1  # still pending in Redis...
    clock.now += PENDING_TTL
    two.check_login(IP, "alice")  # ...until it is taken for lost
    two.release(IP, "alice")


def test_a_registration_given_back_while_redis_is_away_stays_counted(node, clock):
    # The safe side: the address's quota is one smaller until that entry leaves its window.
    limits = Limits(registrations_per_ip=1, registration_window=3600)
    one, two = node(limits), node(limits)
    counted_at = one.register_attempt(IP)
    one.link.cut = True
    one.registration_released(IP, counted_at)
    with pytest.raises(RateLimited):
        two.register_attempt(IP)
    clock.now += 3600
    two.register_attempt(IP)


# --- end to end -----------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_servers_share_the_login_limit_and_keep_working_without_redis(
        server_factory, redis_server, tmp_path):
    # Two nodes of one cluster: one PostgreSQL schema, one Redis, one pepper.
    shared = {"redis": redis_server.url, "redis_prefix": redistest.unique_prefix(),
              "pepper_file": str(tmp_path / "pepper"), "login_account_failures": 3,
              "login_max_delay": 600}
    one = server_factory(**shared)
    two = server_factory(data_dir=str(tmp_path / "node2"), **shared)
    one.register("victim")
    c = one.client()
    for _ in range(3):
        assert c.login("victim", "wrong guess number one")["code"] == "invalid_credentials"
    limited = two.client().login("victim")
    assert limited["code"] == "rate_limited" and limited["retry_after"] >= 1
    # Redis stopped: the nodes go on, each limiting on its own; the failed call is counted.
    redis_server.stop()
    two.register("bystander")
    assert two.client().login("bystander")["type"] == "welcome"
    assert one.client().login("bystander", PASSWORD)["type"] == "welcome"
    errors = two.server.metrics.registry.get_sample_value("chat_redis_errors_total")
    assert errors is not None and errors >= 1


def test_redis_holds_no_account_name_in_the_clear(node) -> None:
    # What was typed as a username may be a password typed in the wrong field.
    t = node(Limits(account_failures=3))
    attempt_failed(t, account="hunter2-typed-as-a-name")
    keys = [k.decode() for k in t.link.scan_iter(match=f"{t.prefix}:*")]
    assert keys and not any("hunter2" in k for k in keys), keys
