"""Run the usual attacks against a chat server and print what happened to them and to
legitimate users meanwhile.

    python bench/abuse.py                      # starts its own server (temporary data)
    python bench/abuse.py --server 127.0.0.1:7072 --cafile ca.crt   # an existing one

Attackers connect from 127.0.0.2 and legitimate users from 127.0.0.1, so that per-address
limits apply to the attackers only, as they would on the internet. Every loop is bounded
in count and time, and only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chat import tls  # noqa: E402

PASSWORD = "legitimate users passphrase 2026"
ATTACKER = "127.0.0.2"  # each attack gets its own address from 127.0.0.10 on
LEGIT = "127.0.0.1"


class Conn:
    """A blocking line client (one thread per connection)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, source: str,
                 timeout: float = 10.0, handshake: bool = True, rcvbuf: int = 0) -> None:
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        raw.settimeout(timeout)
        raw.bind((source, 0))
        raw.connect((host, port))
        self.raw = raw
        if handshake:
            self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
            self.file = self.sock.makefile("rwb")
            self.hello = self.recv()
        self.n = 0

    def send(self, frame: dict) -> None:
        self.file.write(json.dumps(frame).encode() + b"\n")
        self.file.flush()

    def recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def request(self, frame: dict) -> dict:
        self.n += 1
        self.send({**frame, "id": self.n})
        while True:
            reply = self.recv()
            if reply.get("re") == self.n:
                return reply

    def close(self) -> None:
        try:
            getattr(self, "sock", self.raw).close()
        except OSError:
            pass


class Legit:
    """Two logged-in users chatting all along, measuring each message's round trip."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.a = Conn(host, port, ctx, LEGIT)
        self.b = Conn(host, port, ctx, LEGIT)
        for c, name in ((self.a, "legit_a"), (self.b, "legit_b")):
            r = c.request({"type": "register", "username": name, "password": PASSWORD})
            assert r["type"] in ("ok", "error"), r
            w = c.request({"type": "login", "username": name, "password": PASSWORD})
            assert w["type"] == "welcome", w
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            text = f"legit {i}"
            start = time.perf_counter()
            try:
                echo = self.a.request({"type": "send", "room": "general", "message": text})
                if echo["type"] != "message":
                    raise ValueError(echo)
                while True:
                    f = self.b.recv()
                    if f.get("type") == "message" and f.get("message") == text:
                        break
                    if f.get("type") == "bye":
                        raise EOFError(f)
                    if f.get("type") == "ping":
                        self.b.send({"type": "pong"})
            except (OSError, EOFError, ValueError) as exc:
                self.errors.append(repr(exc))
                return
            self.latencies.append(time.perf_counter() - start)
            time.sleep(0.2)  # 5 a second: a fast typist, within the frame limit

    def window(self) -> tuple[int, int]:
        return len(self.latencies), len(self.errors)

    def summary(self, since: tuple[int, int]) -> str:
        lat = self.latencies[since[0]:]
        errs = self.errors[since[1]:]
        if errs:
            return f"YES: {errs[0]}"
        if not lat:
            return "YES: no message got through"
        p99 = (statistics.quantiles(lat, n=100, method="inclusive")[98] if len(lat) >= 2
               else lat[0])
        p50 = statistics.median(lat)
        verdict = "no" if p99 < 0.05 else "slower"
        return (f"{verdict} ({len(lat)} msgs, p50 {p50 * 1000:.1f} ms, "
                f"p99 {p99 * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms)")


def _tally(host, port, ctx, src, frames) -> tuple[int, dict]:
    """Send each frame as a request from one connection; count the replies by code."""
    c = Conn(host, port, ctx, src)
    codes = Counter(r.get("code", r["type"]) for r in map(c.request, frames))
    c.close()
    return len(frames), dict(codes)


def attack_guessing(host, port, ctx, src, n=40):
    return _tally(host, port, ctx, src, [
        {"type": "login", "username": "legit_a", "password": f"guess number {i}!"}
        for i in range(n)])


def attack_spraying(host, port, ctx, src, n=80):
    return _tally(host, port, ctx, src, [
        {"type": "login", "username": f"user{i}", "password": "Summer2026!Summer"}
        for i in range(n)])


def attack_registration(host, port, ctx, src, n=30):
    return _tally(host, port, ctx, src, [
        {"type": "register", "username": f"spam{i}{os.getpid()}",
         "password": "spam spam lovely spam 42"} for i in range(n)])


def attack_flood(host, port, ctx, src, n=2000):
    c = Conn(host, port, ctx, src)
    c.request({"type": "login", "username": "flooder", "password": "flood the room please 9"})
    data = b"".join(b'{"type":"send","room":"general","message":"FLOOD","id":%d}\n' % i
                    for i in range(n))
    c.file.write(data)
    c.file.flush()
    codes = Counter()
    # A server may refuse what is over the rate, or pace it (then this would take n/rate
    # seconds): count what comes back within five.
    c.sock.settimeout(1.0)
    end = time.monotonic() + 5.0
    try:
        while sum(codes.values()) < n and time.monotonic() < end:
            f = c.recv()
            if "re" in f:
                codes[f.get("code", f["type"])] += 1
    except TimeoutError:
        pass
    except (OSError, EOFError):
        codes["closed"] += 1
    codes["not yet handled after 5 s"] = n - sum(codes.values())
    c.close()
    return n, dict(codes)


def attack_slowloris(host, port, ctx, src, n=40):
    socks, refused = [], 0
    for _ in range(n):
        try:
            socks.append(Conn(host, port, ctx, src, handshake=False))
        except OSError:
            refused += 1
    # Which of them the server closed (per-address limit at once; the rest after the
    # handshake timeout, which the caller sets short).
    closed = 0
    deadline = time.monotonic() + 15
    for s in socks:
        s.raw.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if s.raw.recv(1) == b"":
                closed += 1
        except (ConnectionError, TimeoutError, OSError):
            closed += 1
        s.close()
    return n, {"closed by server": closed, "refused": refused, "held": n - closed - refused}


def attack_garbage(host, port, ctx, src, n=20):
    outcomes = Counter()
    for i in range(n):
        raw = socket.create_connection((host, port), timeout=10, source_address=(src, 0))
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" if i % 2 else os.urandom(512))
        try:
            data = raw.recv(4096)
            outcomes["json reply" if data.startswith(b"{") else "closed, no json"] += 1
        except (ConnectionError, OSError):
            outcomes["closed, no json"] += 1
        raw.close()
    # Malformed frames over TLS.
    c = Conn(host, port, ctx, src)
    c.file.write(b"not json\n" * 5 + b"[" * 5000 + b"\n" + b'{"type":1}\n')
    c.file.flush()
    for _ in range(7):
        outcomes["tls: " + c.recv().get("code", "?")] += 1
    c.close()
    return n + 7, dict(outcomes)


def attack_never_reads(host, port, ctx, src, n=80):
    # A client asks for history again and again and never reads the answers.
    w = Conn(host, port, ctx, LEGIT)
    w.request({"type": "login", "username": "writer", "password": PASSWORD})
    text = "x" * 3900
    for _ in range(60):  # within the frame limit's burst and rate
        while w.request({"type": "send", "room": "general", "message": text})["type"] != "message":
            time.sleep(0.2)
    w.close()
    c = Conn(host, port, ctx, src, rcvbuf=4096)
    c.request({"type": "login", "username": "deadreader", "password": "i never read a thing 7"})
    for i in range(n):
        c.send({"type": "history", "room": "general", "limit": 200, "id": i})
        if i >= 25:
            time.sleep(0.1)  # keep to the frame rate: this client is polite, just deaf
    time.sleep(3)  # let the server find out
    outcome = "still connected"
    try:
        c.sock.settimeout(5)
        while True:
            f = c.recv()
            if f.get("type") == "bye":
                outcome = f"bye {f['reason']}"
                break
    except (OSError, EOFError, ValueError):
        outcome = "dropped"
    c.close()
    return n, {"reader": outcome}


def attack_login_storm(host, port, ctx, src, n=98):
    # Seven more addresses, 14 connections each, all asking at once: more password checks
    # than the bcrypt workers and their queue hold.
    conns = []
    for i in range(n):
        conns.append(Conn(host, port, ctx, f"127.0.1.{1 + i // 14}"))
    for i, c in enumerate(conns):
        c.send({"type": "login", "username": f"storm{i}", "password": "storm storm storm 1",
                "id": 1})
    codes = Counter()
    for c in conns:
        while True:
            f = c.recv()
            if f.get("re") == 1:
                codes[f.get("code", f["type"])] += 1
                break
        c.close()
    return n, dict(codes)


def attack_login_rate(host, port, ctx, src, rate=100, seconds=10):
    """100 logins a second for 10 s from 25 addresses, each for a different name: no
    per-account or per-address limit applies, so only the bcrypt pool stands in the way.
    Unknown names cost the same bcrypt work as real ones."""
    conns = [Conn(host, port, ctx, f"127.0.2.{1 + i // 4}") for i in range(100)]
    codes: Counter = Counter()
    lock = threading.Lock()
    per = rate * seconds // len(conns)
    step = len(conns) / rate

    def worker(n: int, c: Conn, start: float) -> None:
        for k in range(per):
            delay = start + k * step - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            r = c.request({"type": "login", "username": f"storm{n}x{k}",
                           "password": "not a real password 1"})
            with lock:
                codes[r.get("code", r["type"])] += 1

    start = time.perf_counter() + 0.5
    threads = [threading.Thread(target=worker, args=(n, c, start + n / rate))
               for n, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds * 6)
    for c in conns:
        c.close()
    took = time.perf_counter() - start
    codes["checked per second"] = round(codes["invalid_credentials"] / took, 1)
    return sum(v for k, v in codes.items() if k != "checked per second"), dict(codes)


def _rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


SERVER_PID: int | None = None  # set by main when it started the server itself


def attack_newline_flood(host, port, ctx, src, conns=16, seconds=5.0):
    """16 connections from one address, never logged in, each writing full TLS records of
    newlines as fast as the server takes them: every newline is an empty (bad) frame."""
    record = b"\n" * 16383  # one TLS record's worth of plaintext
    rss_before = _rss_kib(SERVER_PID)
    outcome: Counter = Counter()
    written = [0]
    lock = threading.Lock()

    def one() -> None:
        try:
            c = Conn(host, port, ctx, src)
        except (OSError, EOFError):
            with lock:
                outcome["refused"] += 1
            return
        c.sock.settimeout(2.0)
        end = time.monotonic() + seconds
        how = "open at the end"
        try:
            while time.monotonic() < end:
                c.sock.sendall(record)
                with lock:
                    written[0] += len(record)
        except (OSError, ValueError) as exc:
            how = ("server stopped reading" if isinstance(exc, TimeoutError)
                   else "closed by server")
        with lock:
            outcome[how] += 1
        c.close()

    threads = [threading.Thread(target=one) for _ in range(conns)]
    for t in threads:
        t.start()
    peak = rss_before
    while any(t.is_alive() for t in threads):
        rss = _rss_kib(SERVER_PID)
        if rss is not None and peak is not None:
            peak = max(peak, rss)
        time.sleep(0.1)
    for t in threads:
        t.join()
    outcome["MB written"] = round(written[0] / 1e6, 1)
    if rss_before is not None and peak is not None:
        outcome["server RSS MB before/peak"] = f"{rss_before // 1024}/{peak // 1024}"
    return conns, dict(outcome)


class _Drain:
    """Reads and counts every frame for many sockets on one thread, as idle users do."""

    def __init__(self, socks: list[ssl.SSLSocket]) -> None:
        import selectors
        self.sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
        self.frames = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                sock = key.fileobj
                try:
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            self.sel.unregister(sock)
                            break
                        self.frames += data.count(b"\n")
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                except OSError:
                    self.sel.unregister(sock)


_NEXT_BLOCK = [0]  # each batch of registrations gets addresses of its own


def _register_many(host, port, ctx, names: list[str], password: str) -> None:
    """Register every name, 5 per address (the default limit), retrying server_busy."""
    _NEXT_BLOCK[0] += 1
    block = _NEXT_BLOCK[0]
    failed: list[str] = []

    def register(k: int) -> None:
        c = Conn(host, port, ctx, f"127.{10 + block}.{k // 250}.{1 + k % 250}", timeout=120)
        for name in names[k * 5:(k + 1) * 5]:
            while True:
                r = c.request({"type": "register", "username": name, "password": password})
                if r.get("code") != "server_busy":
                    break
                time.sleep(0.2)
            if r["type"] != "ok" and r.get("code") != "username_taken":
                failed.append(f"{name}: {r}")
        c.close()

    threads = [threading.Thread(target=register, args=(k,)) for k in range((len(names) + 4) // 5)]
    for i in range(0, len(threads), 32):  # within the bcrypt queue
        for t in threads[i:i + 32]:
            t.start()
        for t in threads[i:i + 32]:
            t.join()
    if failed:
        raise RuntimeError(f"{len(failed)} registrations failed, e.g. {failed[0]}")


def _login(host, port, ctx, src: str, name: str, password: str) -> Conn:
    c = Conn(host, port, ctx, src, timeout=120)
    while True:
        r = c.request({"type": "login", "username": name, "password": password})
        if r.get("code") != "server_busy":
            break
        time.sleep(0.2)
    if r["type"] != "welcome":
        raise RuntimeError(f"login {name}: {r}")
    return c


def _online_users(host, port, ctx, n: int, prefix: str) -> list[Conn]:
    """n users logged in, 16 per address (the default limit)."""
    names = [f"{prefix}{i}" for i in range(n)]
    _register_many(host, port, ctx, names, PASSWORD)
    conns: list[Conn] = []
    lock = threading.Lock()
    _NEXT_BLOCK[0] += 1
    block = _NEXT_BLOCK[0]

    def login(k: int) -> None:
        for i in range(k, n, 16):
            c = _login(host, port, ctx, f"127.{10 + block}.{i // 16 // 250}.{1 + i // 16 % 250}",
                       names[i], PASSWORD)
            with lock:
                conns.append(c)

    threads = [threading.Thread(target=login, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(conns) != n:
        raise RuntimeError(f"only {len(conns)} of {n} users logged in")
    return conns


def _presence_storm(host, port, ctx, src, room: str, online=400, togglers=16, seconds=10.0):
    users = _online_users(host, port, ctx, online, f"idle{room}")
    for c in users:
        if room != "general":
            c.request({"type": "join", "room": room})
    drain = _Drain([c.sock for c in users])
    time.sleep(1.0)  # the joins' presence, before counting
    base = drain.frames
    codes: Counter = Counter()
    lock = threading.Lock()
    names = [f"tog{room}{i}" for i in range(togglers)]
    _register_many(host, port, ctx, names, "toggle toggle toggle 9")
    toggling = [_login(host, port, ctx, src, name, "toggle toggle toggle 9") for name in names]

    def toggle(i: int) -> None:
        c = toggling[i]
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            op = "leave" if k % 2 == 0 else "join"
            if room != "general" and k == 0:
                op = "join"
            r = c.request({"type": op, "room": room})
            with lock:
                codes[r.get("code", r["type"])] += 1
            k += 1
            time.sleep(0.1)  # 10 frames a second: inside the default limits
        c.close()

    threads = [threading.Thread(target=toggle, args=(i,)) for i in range(togglers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not threads:
        time.sleep(seconds)
    time.sleep(1.0)  # what was still on its way
    took = time.perf_counter() - start
    drain.stop.set()
    drain.thread.join()
    codes["frames to the idle users"] = drain.frames - base
    codes["per second"] = round((drain.frames - base) / took)
    for c in users:
        c.close()
    return sum(v for k, v in codes.items() if k in ("ok", "error", "forbidden",
                                                     "rate_limited")), dict(codes)


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def _settle(limit: float = 60.0) -> None:
    """Wait until the server is quiet: under 20% of a core for half a second, twice."""
    quiet, end = 0, time.monotonic() + limit
    while quiet < 2 and time.monotonic() < end:
        before = _cpu_s(SERVER_PID)
        time.sleep(0.5)
        after = _cpu_s(SERVER_PID)
        if before is None or after is None:
            return
        quiet = quiet + 1 if (after - before) < 0.1 else 0


def _flood_for(conns: list[Conn], payload: bytes, seconds: float, reply: bytes) -> Counter:
    """Each connection writes `payload` again and again for `seconds`, its replies read and
    counted by a thread of its own; the server's CPU over the while is in the outcome."""
    outcome: Counter = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    cpu0 = _cpu_s(SERVER_PID)

    def reader(c: Conn) -> None:
        c.sock.settimeout(0.5)
        while time.monotonic() < end + 1:
            try:
                data = c.sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ValueError):
                return
            if not data:
                return
            with lock:
                outcome["answered"] += data.count(reply)

    def writer(c: Conn) -> None:
        while time.monotonic() < end:
            try:
                c.sock.sendall(payload)
            except TimeoutError:
                continue  # the server reads no faster than it lets us: pacing
            except (OSError, ValueError):
                with lock:
                    outcome["closed by server"] += 1
                return

    threads = [threading.Thread(target=f, args=(c,)) for c in conns for f in (reader, writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = _cpu_s(SERVER_PID)
    if cpu0 is not None and cpu1 is not None:
        outcome["server CPU %"] = round((cpu1 - cpu0) / seconds * 100)
    for c in conns:
        c.close()
    return outcome


def attack_heavy_frames(host, port, ctx, src, conns=48, seconds=10.0):
    """48 connections from 3 addresses, never logged in, each sending valid pings padded
    with 4,000 numbers (16 KB, about a millisecond to parse each)."""
    payload = b'{"type":"ping","x":[' + b",".join([b"1e1"] * 4000) + b']}\n'
    base = src.rsplit(".", 1)[0]
    clients = [Conn(host, port, ctx, f"{base}.{200 + i // 16}", timeout=2.0)
               for i in range(conns)]
    return conns, dict(_flood_for(clients, payload, seconds, b'"type":"pong"'))


def attack_history_rows(host, port, ctx, src, sessions=16, seconds=10.0):
    """200 short messages in a room, then 16 sessions of one account each pipelining
    history pages of 200 of them: little in bytes, much in rows."""
    names = [f"rowfill{i}" for i in range(10)] + ["rowreader"]
    _register_many(host, port, ctx, names, "rows rows rows rows 7")
    base = src.rsplit(".", 1)[0]
    fillers = [_login(host, port, ctx, f"{base}.199", name, "rows rows rows rows 7")
               for name in names[:10]]
    for c in fillers:
        c.request({"type": "join", "room": "rows"})
        for k in range(20):  # within the frame burst
            c.send({"type": "send", "room": "rows", "message": f"r{k}"})
    for c in fillers:
        c.close()
    readers = [_login(host, port, ctx, src, "rowreader", "rows rows rows rows 7")
               for _ in range(sessions)]
    for c in readers:
        c.request({"type": "join", "room": "rows"})
    payload = b'{"type":"history","room":"rows","limit":200}\n' * 20
    return sessions, dict(_flood_for(readers, payload, seconds, b'"type":"history"'))


def attack_presence_control(host, port, ctx, src):
    """The same 400 online and 10 s, nobody toggling: what 400 members cost by themselves."""
    return _presence_storm(host, port, ctx, src, "quiet", togglers=0)


def attack_presence_general(host, port, ctx, src):
    return _presence_storm(host, port, ctx, src, "general")


def attack_presence_room(host, port, ctx, src):
    return _presence_storm(host, port, ctx, src, "lobby")


ATTACKS = [
    ("password guessing, one account", attack_guessing),
    ("password spraying, one address", attack_spraying),
    ("registration spam", attack_registration),
    ("frame flood (2000 sends at once)", attack_flood),
    ("slowloris (TCP, no handshake)", attack_slowloris),
    ("plaintext, garbage, bad JSON", attack_garbage),
    ("login storm (98 at once, 7 addresses)", attack_login_storm),
    ("client that never reads (80 history requests)", attack_never_reads),
    ("login storm, 100/s for 10 s, 25 addresses", attack_login_rate),
    ("newline flood before login (16 connections)", attack_newline_flood),
    ("heavy frames: 16 KB of numbers, 48 connections, no login", attack_heavy_frames),
    ("history pages of 200 short messages, 16 sessions", attack_history_rows),
    ("presence control: 400 online in a room, nobody toggles", attack_presence_control),
    ("presence storm: 16 toggle general, 400 online", attack_presence_general),
    ("presence storm: 16 toggle a room of 400", attack_presence_room),
]


def start_server(tmp: Path, rounds: int) -> tuple[subprocess.Popen, int, Path]:
    cmd = [sys.executable, "-m", "chat.server", "--port", "0", "--data-dir", str(tmp),
           "--bcrypt-rounds", str(rounds), "--handshake-timeout", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"listening on [^:]+:(\d+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1)), tmp / "certs" / "ca.crt"
    raise SystemExit("server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--cafile", help="CA of that server")
    ap.add_argument("--bcrypt-rounds", type=int, default=12)
    ap.add_argument("--only", help="run only the attacks whose name contains this text")
    args = ap.parse_args()
    global SERVER_PID
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.server:
            host, _, port_s = args.server.rpartition(":")
            port, cafile = int(port_s), Path(args.cafile)
        else:
            proc, port, cafile = start_server(Path(tmp), args.bcrypt_rounds)
            SERVER_PID = proc.pid
            host = "127.0.0.1"
        ctx = tls.client_context(cafile)
        try:
            legit = Legit(host, port, ctx)
            # Accounts the attacks log in to, registered beforehand from the legitimate
            # address, as users would have.
            setup = Conn(host, port, ctx, "127.0.0.3")  # within its 5 registrations
            for name, pw in (("flooder", "flood the room please 9"),
                             ("deadreader", "i never read a thing 7"), ("writer", PASSWORD)):
                setup.request({"type": "register", "username": name, "password": pw})
            setup.close()
            rows = []
            for n, (name, fn) in enumerate(ATTACKS):
                if args.only and args.only not in name:
                    continue
                _settle()  # the last attack's queued work (bcrypt, say) is not this one's
                mark = legit.window()
                start = time.perf_counter()
                attempts, outcome = fn(host, port, ctx, f"127.0.0.{10 + n}")
                took = time.perf_counter() - start
                # Watch the legitimate users for at least two seconds around each attack.
                time.sleep(max(0.0, 2.0 - took))
                rows.append((name, attempts, outcome, took, legit.summary(mark)))
                print(f"done: {name}", file=sys.stderr)
            legit.stop.set()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print("| attack | attempts | outcome | seconds | legitimate users affected |")
    print("| --- | --- | --- | --- | --- |")
    for name, attempts, outcome, took, affected in rows:
        text = ", ".join(f"{k}: {v}" for k, v in outcome.items())
        print(f"| {name} | {attempts} | {text} | {took:.1f} | {affected} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
