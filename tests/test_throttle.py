"""Throttling: unit tests with a fake clock, and the limits seen over real TLS."""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
from collections import deque

import pytest
import redistest
from conftest import PASSWORD, TIMEOUT
from hypothesis import assume, given
from hypothesis import strategies as st

from chat.errors import RateLimited, ServerBusy
from chat.throttle import Limits, Throttle, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make(request, clock):
    """Builds the throttle under test from its limits: the in-memory one, or the cluster's
    in a Redis of the test's own (chat.throttle_redis), which must behave the same."""
    if request.param == "memory":
        yield lambda limits: Throttle(limits, clock)
        return
    from chat.throttle_redis import RedisThrottle, connect

    client = connect(request.getfixturevalue("redis_server").url)
    prefix = redistest.unique_prefix()
    yield lambda limits: RedisThrottle(limits, client, prefix, clock)
    client.close()


def fail(t, n: int, ip: str = "1.1.1.1", account: str = "alice") -> None:
    for _ in range(n):
        t.login_failed(ip, account)


def test_account_delays_start_at_threshold_and_double(make, clock):
    t = make(Limits(account_failures=5, ip_failures=1000, max_delay=60))
    fail(t, 4)
    t.check_login("1.1.1.1", "alice")  # four failures: still free
    t.login_failed("1.1.1.1", "alice")
    waits = []
    for _ in range(8):
        with pytest.raises(RateLimited) as exc:
            t.check_login("1.1.1.1", "alice")
        waits.append(exc.value.retry_after)
        clock.now += exc.value.retry_after
        t.check_login("1.1.1.1", "alice")
        t.login_failed("1.1.1.1", "alice")
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]  # doubling, capped at max_delay


def test_limited_account_refuses_every_attempt_until_the_delay_passes(make, clock):
    t = make(Limits(account_failures=5, max_delay=900))
    fail(t, 8)
    for ip in ("1.1.1.1", "2.2.2.2"):  # another address does not escape the account limit
        with pytest.raises(RateLimited):
            t.check_login(ip, "alice")
    t.check_login("1.1.1.1", "bob")  # other accounts are unaffected


def test_success_resets_the_account(make, clock):
    t = make(Limits(account_failures=5))
    fail(t, 5)
    clock.now += 1
    t.check_login("1.1.1.1", "alice")
    t.login_succeeded("1.1.1.1", "alice")
    fail(t, 4)
    t.check_login("1.1.1.1", "alice")


def test_failures_leave_the_window(make, clock):
    t = make(Limits(window=900, account_failures=5))
    fail(t, 5)
    with pytest.raises(RateLimited):
        t.check_login("1.1.1.1", "alice")
    clock.now += 901
    t.check_login("1.1.1.1", "alice")


def test_password_spraying_is_limited_per_ip(make, clock):
    t = make(Limits(account_failures=5, ip_failures=20, window=900))
    for i in range(20):
        fail(t, 1, ip="6.6.6.6", account=f"user{i}")
    with pytest.raises(RateLimited) as exc:
        t.check_login("6.6.6.6", "user999")
    assert 0 < exc.value.retry_after <= 900
    t.check_login("7.7.7.7", "user999")


def test_registrations_per_ip(make, clock):
    t = make(Limits(registrations_per_ip=5, registration_window=3600))
    for _ in range(5):
        t.register_attempt("3.3.3.3")
    with pytest.raises(RateLimited) as exc:
        t.register_attempt("3.3.3.3")
    assert exc.value.retry_after == 3600
    t.register_attempt("4.4.4.4")
    clock.now += 3600
    t.register_attempt("3.3.3.3")


def test_a_released_registration_is_given_back(make, clock):
    t = make(Limits(registrations_per_ip=2, registration_window=3600))
    first = t.register_attempt("3.3.3.3")
    clock.now += 100
    second = t.register_attempt("3.3.3.3")
    t.registration_released("3.3.3.3", second)
    clock.now += 100
    t.register_attempt("3.3.3.3")  # the given-back one is free again
    with pytest.raises(RateLimited) as exc:
        t.register_attempt("3.3.3.3")
    # The first attempt kept its own place in the window.
    assert exc.value.retry_after == pytest.approx(first + 3600 - clock.now)
    t.registration_released("3.3.3.3", -1.0)  # unknown or long expired: nothing happens
    t.registration_released("9.9.9.9", first)


def test_idle_entries_are_pruned(clock):
    t = Throttle(Limits(), clock)
    for i in range(3000):
        t.login_failed(f"10.0.{i // 256}.{i % 256}", f"u{i}")
        clock.now += 10
    assert len(t._accounts) < 1200 and len(t._ips) < 1200


def test_registration_limit_over_tls(server_factory):
    server = server_factory(registrations_per_ip=2)
    c = server.client()
    for name in ("one", "two"):
        assert c.request({"type": "register", "username": name, "password": PASSWORD})[
            "type"] == "ok"
    reply = c.request({"type": "register", "username": "three", "password": PASSWORD})
    assert reply["code"] == "rate_limited" and reply["retry_after"] >= 1


def test_what_counts_towards_the_registration_limit(server_factory):
    # Refused before the limit is checked: never counted. A taken name: counted (the
    # bcrypt work is done, and the answer tells the client the name exists).
    server = server_factory(registrations_per_ip=2)
    c = server.client()
    for _ in range(3):
        assert c.request({"type": "register", "username": "ann", "password": "short"})[
            "code"] == "weak_password"
        assert c.request({"type": "register", "username": "a b", "password": PASSWORD})[
            "code"] == "invalid_username"
    assert c.request({"type": "register", "username": "ann", "password": PASSWORD})[
        "type"] == "ok"
    assert c.request({"type": "register", "username": "ANN", "password": PASSWORD})[
        "code"] == "username_taken"
    assert c.request({"type": "register", "username": "bea", "password": PASSWORD})[
        "code"] == "rate_limited"


class _GatedHash:
    """Holds every bcrypt hash until `gate` opens; `entered` says one has started."""

    def __init__(self, server) -> None:
        self.real = server.hasher.hash
        self.gate = threading.Event()
        self.entered = threading.Event()
        server.hasher.hash = self

    def __call__(self, password: str) -> str:
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        return self.real(password)


def test_server_busy_gives_the_registration_back(server_factory, monkeypatch):
    # One worker and one queue slot, both held: the third registration gets server_busy,
    # and must not use up the address's quota of three.
    server = server_factory(registrations_per_ip=3, auth_workers=1, auth_queue=1)
    pool = server.server.auth_pool
    outcomes: queue.Queue[str] = queue.Queue()
    real_submit = pool.submit

    def submit(fn):
        try:
            real_submit(fn)
        except ServerBusy:
            outcomes.put("busy")
            raise
        outcomes.put("queued")

    monkeypatch.setattr(pool, "submit", submit)
    hashing = _GatedHash(server.server)
    clients = [server.client() for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            c.send({"type": "register", "username": f"user{i}", "password": PASSWORD, "id": 1})
            assert outcomes.get(timeout=TIMEOUT) == ("busy" if i == 2 else "queued")
            if i == 0:
                assert hashing.entered.wait(TIMEOUT)  # the worker holds it; the queue is free
        assert clients[2].recv()["code"] == "server_busy"
    finally:
        hashing.gate.set()
    assert [c.recv()["type"] for c in clients[:2]] == ["ok", "ok"]
    again = clients[2].request({"type": "register", "username": "user2", "password": PASSWORD})
    assert again["type"] == "ok"
    assert clients[2].request({"type": "register", "username": "user3", "password": PASSWORD})[
        "code"] == "rate_limited"


def test_shutting_down_gives_the_registration_back(server_factory):
    server = server_factory(registrations_per_ip=1, auth_workers=1)
    server.server.auth_pool.stop()  # as at shutdown: it takes no more work
    c = server.client()
    reply = c.request({"type": "register", "username": "late", "password": PASSWORD})
    assert reply["code"] == "server_busy"
    assert server.server.throttle._registrations["127.0.0.1"].times == deque()


def test_an_internal_error_before_hashing_gives_the_registration_back(server_factory):
    server = server_factory(registrations_per_ip=1)
    real = server.server.hasher.hash
    calls = []

    def fails_once(password: str) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a passing fault")
        return real(password)

    server.server.hasher.hash = fails_once
    c = server.client()
    assert c.request({"type": "register", "username": "dan", "password": PASSWORD})[
        "code"] == "internal"
    assert c.request({"type": "register", "username": "dan", "password": PASSWORD})[
        "type"] == "ok"


def test_login_throttled_even_with_right_password(server_factory):
    server = server_factory(login_account_failures=3, login_max_delay=600)
    server.register("victim")
    c = server.client()
    for _ in range(3):
        assert c.login("victim", "wrong guess number one")["code"] == "invalid_credentials"
    limited = c.login("victim")
    assert limited["code"] == "rate_limited" and limited["retry_after"] >= 1
    # Other accounts log in as usual.
    server.register("bystander")
    assert server.client().login("bystander")["type"] == "welcome"


def test_token_bucket(clock):
    from chat.throttle import TokenBucket

    bucket = TokenBucket(rate=10, burst=30, clock=clock)
    assert all(bucket.take() == 0 for _ in range(30))
    wait = bucket.take()
    assert 0 < wait <= 0.1
    clock.now += 0.5
    assert sum(bucket.take() == 0 for _ in range(10)) == 5  # 10/s for half a second


def test_connections_per_ip(server_factory):
    from conftest import Client

    server = server_factory(max_connections_per_ip=3)
    clients = [server.client() for _ in range(3)]
    with pytest.raises((OSError, EOFError)):
        Client(server.host, server.port, server.cafile)
    assert clients[0].request({"type": "ping"})["type"] == "pong"


# --- IPv6: every per-address limit counts a network, not an address ---------------------


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.1", 64, "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2ff::1", 56, "2001:db8:1:200::/56"),
        ("2001:db8::1", 128, "2001:db8::1/128"),
        ("2001:0DB8:0000::0001", 128, "2001:db8::1/128"),  # one spelling per address
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),  # IPv4-mapped counts as IPv4
        ("::ffff:192.0.2.1", 128, "192.0.2.1"),
        ("fe80::1%eth0", 64, "fe80::/64"),  # the zone is not part of the host
        ("not-an-address", 64, "not-an-address"),
    ],
)
def test_address_key(ip, prefix, key):
    assert address_key(ip, prefix) == key


@given(a=st.integers(0, 2**128 - 1), b=st.integers(0, 2**128 - 1),
       prefix=st.integers(32, 128), same=st.booleans())
def test_ipv6_addresses_share_a_key_exactly_when_they_share_the_prefix(a, b, prefix, same):
    if same:  # hypothesis would rarely draw two addresses in one network by itself
        host_bits = 128 - prefix
        b = (a >> host_bits << host_bits) | (b & ((1 << host_bits) - 1))
    ip_a, ip_b = ipaddress.IPv6Address(a), ipaddress.IPv6Address(b)
    assume(ip_a.ipv4_mapped is None and ip_b.ipv4_mapped is None)
    shared = a >> (128 - prefix) == b >> (128 - prefix)
    assert (address_key(str(ip_a), prefix) == address_key(str(ip_b), prefix)) == shared


def _ipv6_loopback_works() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(),
                                reason="this machine cannot listen on IPv6 loopback (::1)")


def _peers_from(server, *addresses: str) -> None:
    """Make the server see each next accepted connection as coming from the next address.

    Loopback holds one IPv6 address; two hosts in one /64 take a network this test does
    not have. The rewrite is at accept, so everything after it runs as for real peers.
    """
    real_adopt = server.server.adopt
    queue_ = iter(addresses)

    def adopt(raw, addr):
        real_adopt(raw, (next(queue_), *addr[1:]))

    server.server.adopt = adopt


def _ipv6_server(server_factory, *peers: str, **settings):
    server = server_factory(host="::1", **settings)
    server.host = "::1"
    _peers_from(server, *peers)
    return server


@needs_ipv6
def test_two_ipv6_addresses_in_one_slash_64_share_the_connection_limit(server_factory):
    from conftest import Client

    server = _ipv6_server(server_factory, "2001:db8:1:2::a", "2001:db8:1:2::b",
                          "2001:db8:1:2:ffff::1", "2001:db8:1:3::1", "2001:db8:1:2::c",
                          max_connections_per_ip=2)
    first, second = server.client(), server.client()
    with pytest.raises((OSError, EOFError)):
        Client(server.host, server.port, server.cafile)  # a third from the same /64
    other = server.client()  # the next /64 is another address
    assert other.request({"type": "ping"})["type"] == "pong"
    # Closing one gives the /64 its place back: counted out under the same key.
    first.close()
    srv = server.server
    with srv._count_lock:
        assert srv._count_lock.wait_for(
            lambda: srv._per_ip.get("2001:db8:1:2::/64") == 1, TIMEOUT)
    again = server.client()
    assert again.request({"type": "ping"})["type"] == "pong"
    assert second.request({"type": "ping"})["type"] == "pong"


@needs_ipv6
def test_two_ipv6_addresses_in_one_slash_64_share_the_registration_limit(server_factory):
    server = _ipv6_server(server_factory, "2001:db8:1:2::a", "2001:db8:1:2::b",
                          "2001:db8:1:3::1", registrations_per_ip=1)
    one, two, elsewhere = server.client(), server.client(), server.client()
    assert one.request({"type": "register", "username": "one", "password": PASSWORD})[
        "type"] == "ok"
    assert two.request({"type": "register", "username": "two", "password": PASSWORD})[
        "code"] == "rate_limited"
    assert elsewhere.request({"type": "register", "username": "two", "password": PASSWORD})[
        "type"] == "ok"


@needs_ipv6
def test_two_ipv6_addresses_in_one_slash_64_share_the_login_failure_limit(server_factory):
    server = _ipv6_server(server_factory, "2001:db8:1:2::a", "2001:db8:1:2::b",
                          "2001:db8:1:3::1", login_ip_failures=2,
                          login_account_failures=1000)
    one, two, elsewhere = server.client(), server.client(), server.client()
    for name in ("x1", "x2"):
        assert one.login(name, "not the password at all")["code"] == "invalid_credentials"
    assert two.login("x3", "not the password at all")["code"] == "rate_limited"
    assert elsewhere.login("x3", "not the password at all")["code"] == "invalid_credentials"


@needs_ipv6
def test_ipv6_prefix_128_counts_each_address(server_factory):
    server = _ipv6_server(server_factory, "2001:db8:1:2::a", "2001:db8:1:2::b",
                          registrations_per_ip=1, ipv6_prefix=128)
    for i, c in enumerate((server.client(), server.client())):
        assert c.request({"type": "register", "username": f"user{i}", "password": PASSWORD})[
            "type"] == "ok"


def test_login_storm_gets_server_busy_and_chat_still_flows(server_factory):
    # One worker, one queue slot, a slow hash: the third concurrent login is refused at once.
    server = server_factory(auth_workers=1, auth_queue=1, bcrypt_rounds=13,
                            login_ip_failures=10**6, login_account_failures=10**6)
    chatter = server.user("chatter")  # registered and logged in before the storm (cost 13)
    clients = [server.client() for _ in range(6)]
    for c in clients:
        c.send({"type": "login", "username": "chatter", "password": "wrong guess wrong guess",
                "id": 1})
    # While the pool is saturated, a logged-in user's messages still go through.
    echo = chatter.request({"type": "send", "room": "general", "message": "still here"})
    assert echo["type"] == "message"
    codes = [c.recv_until("error")["code"] for c in clients]
    assert codes.count("server_busy") >= 1
    assert set(codes) <= {"server_busy", "invalid_credentials"}


def test_at_most_one_attempt_per_lockout_after_100_consecutive_failures(make, clock):
    t = make(Limits(account_failures=5, max_delay=900, max_consecutive=100,
                    lockout=86400, window=900))
    attempts = 0
    # An attacker who waits out every delay for a week.
    end = clock.now + 7 * 86400
    while clock.now < end:
        try:
            t.check_login("9.9.9.9", "victim")
        except RateLimited as exc:
            clock.now += exc.retry_after
            continue
        t.login_failed("9.9.9.9", "victim")
        attempts += 1
    assert 100 <= attempts <= 100 + 7  # the cap, then one a day
    assert t.limits.account_delay(100) == 86400


def test_attempts_in_flight_count_against_the_limit(make, clock):
    t = make(Limits(account_failures=3, ip_failures=1000))
    for _ in range(3):
        t.check_login("1.1.1.1", "alice")  # three checks admitted, none finished yet
    with pytest.raises(RateLimited):
        t.check_login("2.2.2.2", "alice")
    t.release("1.1.1.1", "alice")
    t.check_login("2.2.2.2", "alice")


def test_parallel_guesses_over_tls_cannot_pass_the_limit(server_factory):
    server = server_factory(login_account_failures=3, login_max_delay=600, bcrypt_rounds=10)
    server.register("target")
    clients = [server.client() for _ in range(12)]
    for c in clients:
        c.send({"type": "login", "username": "target", "password": "a wrong guess, sorry",
                "id": 1})
    codes = [c.recv_until("error")["code"] for c in clients]
    assert codes.count("invalid_credentials") <= 3
    assert codes.count("rate_limited") >= 9
