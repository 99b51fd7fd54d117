"""Load generator for protocol v1 over TLS: workloads (a) latency, (b) throughput,
(c) many idle connections, (e) storage, against a server already running.

    python bench/loadgen.py WORKLOAD --port P --cafile CA --pid SERVER_PID [options]

One process, one thread, one selector over every client socket, so its own CPU use
(reported) tells whether the generator or the server was the limit. Messages carry
"sender:seq:send_time_ns"; every receiver checks each sender's sequence arrives complete,
once and in order, and any gap, repeat or reorder fails the run. Loopback only; every
workload is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import socket
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import irc
from chat import tls

PASSWORD = "loadgen kettle ivory 7731 zq"
ROOM = "bench"
MSG_RE = re.compile(rb'"message":"(\d+):(\d+):(\d+)"')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tls_connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=120)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname="localhost")


class Client:
    """Set up blocking (register, login, join), then switched to non-blocking."""

    def __init__(self, port: int, ctx: ssl.SSLContext, name: str, *, register: bool) -> None:
        self.sock = _tls_connect(port, ctx)
        self.name = name
        self.buf = b""
        self.n = 0
        self._lines = self.sock.makefile("rb")
        self._recv()  # hello
        if register:
            r = self._request({"type": "register", "username": name, "password": PASSWORD})
            if r["type"] != "ok" and r.get("code") != "username_taken":
                raise SystemExit(f"register failed for {name}: {r}")
        w = self._request({"type": "login", "username": name, "password": PASSWORD})
        if w["type"] != "welcome":
            raise SystemExit(f"login failed for {name}: {w}")
        j = self._request({"type": "join", "room": ROOM})
        if j["type"] != "ok":
            raise SystemExit(f"join failed for {name}: {j}")

    def _recv(self) -> dict:
        return json.loads(self._lines.readline())

    def _request(self, frame: dict) -> dict:
        self.n += 1
        self.sock.sendall(json.dumps({**frame, "id": self.n}).encode() + b"\n")
        while True:
            f = self._recv()
            if f.get("re") == self.n:
                return f

    def go_nonblocking(self) -> None:
        # The makefile reader may hold bytes already read: keep them.
        self.buf = b""
        self.sock.setblocking(False)


class IrcClient:
    """The same, for an IRC server: NICK/USER, JOIN #bench, then PRIVMSGs."""

    def __init__(self, port: int, ctx: ssl.SSLContext, name: str, *, register: bool) -> None:
        self.sock = _tls_connect(port, ctx)
        self.name = name
        self.buf = b""
        self._parser = irc.IrcParser()
        self.sock.sendall(irc.register_lines(name))
        self._until("001")
        self.sock.sendall(irc.join_line("#" + ROOM))
        self._until("366")

    def _until(self, numeric: str) -> None:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise SystemExit(f"{self.name}: server closed during set-up")
            events = self._parser.feed(data)
            out = self._parser.take_outgoing()
            if out:
                self.sock.sendall(out)
            if any(e[0] == numeric for e in events):
                return

    def go_nonblocking(self) -> None:
        self.sock.setblocking(False)


def encode_irc(sender: int, seq: int) -> bytes:
    return b"PRIVMSG #" + ROOM.encode() + b" :%d:%d:%d\r\n" % (sender, seq, time.perf_counter_ns())


IRC_RE = re.compile(rb" PRIVMSG #" + ROOM.encode() + rb" :(\d+):(\d+):(\d+)")
PROTOCOLS = {}  # filled below: name -> (client class, encoder, pattern, sender sees own)


def encode_send(sender: int, seq: int) -> bytes:
    return (b'{"type":"send","room":"' + ROOM.encode() + b'","message":"%d:%d:%d"}\n'
            % (sender, seq, time.perf_counter_ns()))


class Run:
    """The event loop shared by the workloads.

    A sender's acknowledgement is its own echo in protocol v1; IRC sends no echo, so there
    the first non-sender (client `senders`) acknowledges for everyone.
    """

    def __init__(self, clients: list, senders: int, proto: str = "chat") -> None:
        self.clients = clients
        self.senders = senders
        _cls, self.encode, self.pattern, self.echo = PROTOCOLS[proto]
        self.ack_from = None if self.echo else senders
        self.sel = selectors.DefaultSelector()
        for i, c in enumerate(clients):
            c.go_nonblocking()
            self.sel.register(c.sock, selectors.EVENT_READ, i)
        n = len(clients)
        self.last = [[-1] * senders for _ in range(n)]  # last seq seen, per receiver/sender
        self.sent = [0] * senders
        self.acked = [0] * senders  # the sender's own echoes seen
        self.deliveries = 0
        self.errors: list[str] = []
        self.latencies: list[int] = []
        self.pending: dict[int, bytearray] = {}
        self.pongs: list[tuple[int, bytes]] = []

    def send(self, sender: int) -> None:
        c = self.clients[sender]
        data = self.encode(sender, self.sent[sender])
        self.sent[sender] += 1
        out = self.pending.get(sender)
        if out:
            out += data
            return
        try:
            n = c.sock.send(data)
        except ssl.SSLWantWriteError:
            n = 0
        if n < len(data):
            self.pending[sender] = bytearray(data[n:])

    def flush_pending(self) -> None:
        while self.pongs:
            i, data = self.pongs.pop()
            try:
                self.clients[i].sock.send(data)
            except ssl.SSLWantWriteError:
                pass  # the next PING will come round again
        for sender, out in list(self.pending.items()):
            try:
                n = self.clients[sender].sock.send(out)
            except ssl.SSLWantWriteError:
                continue
            del out[:n]
            if not out:
                del self.pending[sender]

    def poll(self, timeout: float, measure: bool) -> None:
        for key, _ in self.sel.select(timeout):
            i = key.data
            c = self.clients[i]
            while True:
                try:
                    data = c.sock.recv(262144)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                if not data:
                    self.errors.append(f"client {i} closed by server")
                    self.sel.unregister(c.sock)
                    break
                data = c.buf + data
                cut = data.rfind(b"\n") + 1
                c.buf = data[cut:]
                self._account(i, data[:cut], measure)
                if not c.sock.pending():
                    break

    def _account(self, i: int, chunk: bytes, measure: bool) -> None:
        last = self.last[i]
        now = time.perf_counter_ns()
        acks = i == self.ack_from
        for s, q, t in self.pattern.findall(chunk):
            sender, seq = int(s), int(q)
            if seq != last[sender] + 1:
                self.errors.append(f"receiver {i}: sender {sender} seq {seq} after {last[sender]}")
            last[sender] = seq
            self.deliveries += 1
            if acks or i == sender:
                self.acked[sender] += 1
            if measure:
                self.latencies.append(now - int(t))
        if self.echo and (b'"type":"error"' in chunk or b'"type":"bye"' in chunk):
            self.errors.append(f"receiver {i}: {chunk[:200]!r}")
        elif not self.echo and b"PING" in chunk:
            for line in chunk.split(b"\n"):
                if line.startswith(b"PING"):
                    self.pongs.append((i, b"PONG" + line[4:].rstrip(b"\r") + b"\r\n"))

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every receiver has every message sent."""
        want = [self.sent[s] - 1 for s in range(self.senders)]
        if not self.echo:  # IRC does not send a sender its own messages
            for s in range(self.senders):
                self.last[s][s] = want[s]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush_pending()
            if all(row == want for row in self.last):
                return
            self.poll(0.05, measure=False)
        missing = sum(1 for row in self.last for s in range(self.senders) if row[s] != want[s])
        self.errors.append(f"{missing} receiver/sender pairs incomplete after {timeout} s")


def connect_all(args, ctx: ssl.SSLContext, n: int, prefix: str) -> list:
    cls = PROTOCOLS[args.proto][0]
    return [cls(args.port, ctx, f"{prefix}{i}", register=args.register) for i in range(n)]


def workload_a(args, ctx) -> dict:
    clients = connect_all(args, ctx, 50, args.prefix)
    run = Run(clients, senders=10, proto=args.proto)
    rate = 500.0
    interval = 10 / rate  # each of 10 senders sends every 20 ms
    start = time.perf_counter()
    cpu0, gen0 = proc_cpu(args.pid), self_cpu()
    k = 0
    while True:
        now = time.perf_counter()
        if now - start >= args.seconds:
            break
        due = start + k * interval / 10
        if now >= due:
            run.send(k % 10)
            k += 1
            continue
        run.flush_pending()
        run.poll(min(0.002, due - now), measure=True)
    run.drain()
    took = time.perf_counter() - start
    lat = sorted(run.latencies)
    return {
        "offered_per_s": rate, "sent": sum(run.sent), "deliveries": run.deliveries,
        "p50_ms": lat[len(lat) // 2] / 1e6 if lat else None,
        "p99_ms": lat[int(len(lat) * 0.99)] / 1e6 if lat else None,
        "max_ms": lat[-1] / 1e6 if lat else None,
        "server_cpu_s": proc_cpu(args.pid) - cpu0, "generator_cpu_s": self_cpu() - gen0,
        "seconds": took, "errors": run.errors[:5], "ok": not run.errors,
    }


def workload_b(args, ctx) -> dict:
    clients = connect_all(args, ctx, 50, args.prefix)
    run = Run(clients, senders=10, proto=args.proto)
    window = 10
    for s in range(10):
        for _ in range(window):
            run.send(s)
    start = time.perf_counter()
    cpu0, gen0 = proc_cpu(args.pid), self_cpu()
    d0 = run.deliveries
    while time.perf_counter() - start < args.seconds:
        run.flush_pending()
        run.poll(0.01, measure=False)
        for s in range(10):
            while run.sent[s] - run.acked[s] < window:
                run.send(s)
    took = time.perf_counter() - start
    deliveries = run.deliveries - d0
    server_cpu, gen_cpu = proc_cpu(args.pid) - cpu0, self_cpu() - gen0
    run.drain()
    return {
        "deliveries": deliveries, "deliveries_per_s": deliveries / took,
        "server_us_per_delivery": server_cpu / deliveries * 1e6 if deliveries else None,
        "server_cpu_s": server_cpu, "generator_cpu_s": gen_cpu, "seconds": took,
        "errors": run.errors[:5], "ok": not run.errors,
    }


def workload_c(args, ctx) -> dict:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    rss0 = proc_rss(args.pid)
    idle = []
    t0 = time.perf_counter()
    for i in range(args.idle):
        c = PROTOCOLS[args.proto][0](args.port, ctx, f"{args.prefix}idle{i}",
                                     register=args.register)
        idle.append(c)
    setup = time.perf_counter() - t0
    time.sleep(2)
    rss1 = proc_rss(args.pid)
    cpu0 = proc_cpu(args.pid)
    time.sleep(args.seconds)
    idle_cpu = proc_cpu(args.pid) - cpu0
    active = connect_all(args, ctx, 10, args.prefix + "act")
    run = Run(active, senders=10, proto=args.proto)
    for k in range(1000):
        run.send(k % 10)
        run.poll(0, measure=False)
    run.drain(30)
    held = sum(1 for c in idle if _alive(c))
    return {
        "idle_connections": args.idle, "held": held, "setup_s": setup,
        "rss_per_connection_kib": (rss1 - rss0) / args.idle / 1024,
        "server_rss_mib": rss1 / 2**20, "idle_cpu_percent": idle_cpu / args.seconds * 100,
        "active_ok": not run.errors, "errors": run.errors[:5],
        "ok": held == args.idle and not run.errors,
    }


def _alive(c: Client) -> bool:
    c.sock.setblocking(False)
    try:
        data = c.sock.recv(65536)
        return bool(data)  # pings or presence: alive; b"" would be a close
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False


PROTOCOLS.update({
    "chat": (Client, encode_send, MSG_RE, True),
    "irc": (IrcClient, encode_irc, IRC_RE, False),
})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["a", "b", "c"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the server's process id")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--prefix", default="bench")
    ap.add_argument("--no-register", dest="register", action="store_false")
    ap.add_argument("--proto", choices=["chat", "irc"], default="chat")
    args = ap.parse_args()
    ctx = tls.client_context(args.cafile)
    result = {"a": workload_a, "b": workload_b, "c": workload_c}[args.workload](args, ctx)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
