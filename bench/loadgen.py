"""Load generator for protocol v1 over TLS: workloads (a) latency, (b) throughput,
(c) many idle connections, (e) storage, (f) (a) and (b) over several nodes, against a
server (or the nodes of a cluster) already running.

    python bench/loadgen.py WORKLOAD --port P --cafile CA --pid SERVER_PID [options]
    python bench/loadgen.py f --ports P1,P2,P3 --pids PID1,PID2,PID3 --cafile CA [options]

One process, one thread, one selector over every client socket, so its own CPU use
(reported) tells whether the generator or the server was the limit. Messages carry
"sender:seq:send_time_ns"; every receiver checks each sender's sequence arrives complete,
once and in order, and any gap, repeat or reorder fails the run. Loopback only; every
workload is bounded in time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import resource
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import irc, nodes
from chat import tls

PASSWORD = "loadgen kettle ivory 7731 zq"
ROOM = "bench"
MSG_RE = re.compile(rb'"message":"(\d+):(\d+):(\d+)"')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_of(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process still there."""
    out = {}
    for pid in pids:
        try:
            out[pid] = proc_cpu(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the processes of `before` used since; one that went counts nothing."""
    now = cpu_of(list(before))
    return sum(now[pid] - before[pid] for pid in now)


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

    def __init__(self, port: int, ctx: ssl.SSLContext, name: str, *, register: bool,
                 room: str | None = ROOM, leave_general: bool = False) -> None:
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
        if leave_general:
            self._request({"type": "leave", "room": "general"})
        if room is not None:
            j = self._request({"type": "join", "room": room})
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


def read_lines(c) -> tuple[bytes, bool]:
    """The whole lines that every TLS record `c` holds now gives (the rest waits in
    c.buf), and whether the server closed. One select and one parse for them all: a
    server writing each line as its own record would otherwise cost the generator a
    select and a parse per line, and make it the limit."""
    chunks, closed = [c.buf], False
    for _ in range(256):
        try:
            data = c.sock.recv(262144)
        except (ssl.SSLWantReadError, BlockingIOError):
            break
        except OSError:
            data = b""
        if not data:
            closed = True
            break
        chunks.append(data)
    data = b"".join(chunks)
    cut = data.rfind(b"\n") + 1
    c.buf = data[cut:]
    return data[:cut], closed


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
        # Per message, its first receipt anywhere: the server's own delay, before its
        # fan-out to 50 and the generator's reading of 50 add theirs.
        self.first: dict[tuple[int, int], int] = {}
        self.pending: dict[int, bytearray] = {}
        self.pongs: list[tuple[int, bytes]] = []
        # (f): each client's node; receipts by others are then kept apart by whether the
        # receiver is on the sender's node or another.
        self.node_of: list[int] | None = None
        self.same_node: list[int] = []
        self.other_node: list[int] = []

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
            lines, closed = read_lines(c)
            if closed:
                self.errors.append(f"client {i} closed by server")
                self.sel.unregister(c.sock)
            if lines:
                self._account(i, lines, measure)

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
                lat = now - int(t)
                self.latencies.append(lat)
                self.first.setdefault((sender, seq), lat)
                if self.node_of is not None and i != sender:
                    same = self.node_of[i] == self.node_of[sender]
                    (self.same_node if same else self.other_node).append(lat)
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


def workload_a(args, ctx, on_start=None) -> dict:
    clients = connect_all(args, ctx, 50, args.prefix)
    run = Run(clients, senders=10, proto=args.proto)
    if on_start is not None:
        on_start()
    rate = 500.0  # each of 10 senders sends every 20 ms
    start = time.perf_counter()
    cpu0, gen0 = proc_cpu(args.pid), self_cpu()
    _paced(args, run, rate)
    run.drain()
    took = time.perf_counter() - start
    lat = sorted(run.latencies)
    first = sorted(run.first.values())
    return {
        "offered_per_s": rate, "sent": sum(run.sent), "deliveries": run.deliveries,
        "p50_ms": lat[len(lat) // 2] / 1e6 if lat else None,
        "p99_ms": lat[int(len(lat) * 0.99)] / 1e6 if lat else None,
        "first_p99_ms": first[int(len(first) * 0.99)] / 1e6 if first else None,
        "max_ms": lat[-1] / 1e6 if lat else None,
        "server_cpu_s": proc_cpu(args.pid) - cpu0, "generator_cpu_s": self_cpu() - gen0,
        "seconds": took, "errors": run.errors[:5], "ok": not run.errors,
    }


def _paced(args, run: Run, rate: float) -> None:
    """`rate` messages a second for args.seconds, the senders in turn, latency measured."""
    start = time.perf_counter()
    k = 0
    while True:
        now = time.perf_counter()
        if now - start >= args.seconds:
            break
        due = start + k / rate
        if now >= due:
            run.send(k % run.senders)
            k += 1
            continue
        run.flush_pending()
        run.poll(min(0.002, due - now), measure=True)


def percentile(values: list[int], q: float) -> float | None:
    """The q-quantile of nanoseconds, in milliseconds."""
    if not values:
        return None
    values = sorted(values)
    return values[min(int(len(values) * q), len(values) - 1)] / 1e6


def workload_b(args, ctx) -> dict:
    clients = connect_all(args, ctx, 50, args.prefix)
    return _throughput(args, Run(clients, senders=10, proto=args.proto))


def _throughput(args, run: Run, side_pids: list[int] | None = None) -> dict:
    """Every sender keeps 10 messages unacknowledged for args.seconds. The server's CPU
    is its processes' (args.pids); `side_pids` (PostgreSQL's backends, Redis) apart."""
    window = 10
    for s in range(run.senders):
        for _ in range(window):
            run.send(s)
    start = time.perf_counter()
    cpu0, side0, gen0 = cpu_of(args.pids), cpu_of(side_pids or []), self_cpu()
    d0 = run.deliveries
    while time.perf_counter() - start < args.seconds:
        run.flush_pending()
        run.poll(0.01, measure=False)
        for s in range(run.senders):
            while run.sent[s] - run.acked[s] < window:
                run.send(s)
    took = time.perf_counter() - start
    deliveries = run.deliveries - d0
    server_cpu, side_cpu, gen_cpu = cpu_since(cpu0), cpu_since(side0), self_cpu() - gen0
    run.drain()
    return {
        "deliveries": deliveries, "deliveries_per_s": deliveries / took,
        "server_us_per_delivery": server_cpu / deliveries * 1e6 if deliveries else None,
        "side_us_per_delivery": side_cpu / deliveries * 1e6 if deliveries else None,
        "server_cpu_s": server_cpu, "side_cpu_s": side_cpu, "generator_cpu_s": gen_cpu,
        "seconds": took, "errors": run.errors[:5], "ok": not run.errors,
    }


def workload_f(args, ctx) -> dict:
    """(a) and (b) over the nodes of a cluster (or one server, for comparison): 48
    clients in one room, client i on node i mod n, the first 12 sending (so 4 on each of
    3 nodes). First each of `--rates` messages a second for args.seconds, for the latency
    from send to receipt on the sender's node and on the others; then each sender keeps
    10 unacknowledged, for deliveries/s and CPU per delivery: the nodes', and apart
    PostgreSQL's backends for --pg-db and the Redis of --redis-pid."""
    n, senders = 48, 12
    ports = args.ports
    clients = _parallel(lambda i: Client(ports[i % len(ports)], ctx, f"{args.prefix}{i}",
                                         register=args.register), n)
    run = Run(clients, senders)
    run.node_of = [i % len(ports) for i in range(n)]
    latency, errors = {}, []
    for rate in args.rates:
        run.same_node, run.other_node = [], []
        _paced(args, run, rate)
        run.drain(30)
        latency[f"{rate:g}"] = {
            "same_p50_ms": percentile(run.same_node, 0.5),
            "same_p99_ms": percentile(run.same_node, 0.99),
            "other_p50_ms": percentile(run.other_node, 0.5),
            "other_p99_ms": percentile(run.other_node, 0.99)}
        errors += run.errors
        run.errors = []
    side = [*(nodes.backend_pids(args.pg_db) if args.pg_db else []),
            *([args.redis_pid] if args.redis_pid else [])]
    result = _throughput(args, run, side)
    return {**result, "nodes": len(ports), "latency": latency,
            "errors": (errors + result["errors"])[:5], "ok": not errors and result["ok"]}


class EncryptedRun(Run):
    """(b) in an end-to-end encrypted room: each sender is a device with a real Megolm
    session and encrypts every message (200 bytes of text, as a client would) when it
    sends. Receivers do not decrypt (the server's cost is measured, and 50 receivers'
    decryption would make the generator the limit): a message is known by its Megolm
    signature, the last 86 characters of its ciphertext, which the sender noted."""

    def __init__(self, clients: list, senders: int, devices: list, room: str) -> None:
        super().__init__(clients, senders, proto="chat")
        import vodozemac

        self.room = room.encode()
        self.groups = [vodozemac.GroupSession() for _ in range(senders)]
        self.heads = [(b'{"type":"send","room":"' + self.room + b'","encrypted":{'
                       b'"algorithm":"megolm","device":"' + d.encode() + b'","sender_key":"'
                       + k.encode() + b'","session_id":"' + g.session_id.encode()
                       + b'","ciphertext":"') for (d, k), g in zip(devices, self.groups,
                                                                   strict=True)]
        self.ids: dict[bytes, tuple[int, int]] = {}
        self.pattern = self
        self.encode = self._encode

    def _encode(self, sender: int, seq: int) -> bytes:
        text = (b"%d:%d:" % (sender, seq)).ljust(200, b".")
        ct = self.groups[sender].encrypt(text).to_base64().encode()
        self.ids[ct[-86:]] = (sender, seq)
        return self.heads[sender] + ct + b'"}}\n'

    def findall(self, chunk: bytes) -> list[tuple[int, int, int]]:
        # What Run._account reads from `pattern.findall`: (sender, seq, sent_ns). Plain
        # bytes searches: a regex for "the 86 characters before the quote" backtracks
        # over every ciphertext and made the generator the limit.
        out = []
        for part in chunk.split(b'"ciphertext":"')[1:]:
            end = part.index(b'"')
            out.append((*self.ids[part[end - 86:end]], 0))
        return out


def workload_be(args, ctx) -> dict:
    """(b) in an encrypted private room: the server relays Megolm envelopes."""
    import vodozemac

    from chat.devices import canonical

    room = f"{args.prefix}enc"
    clients = [Client(args.port, ctx, f"{args.prefix}{i}", register=args.register, room=None)
               for i in range(50)]
    owner = clients[0]
    r = owner._request({"type": "create", "room": room, "visibility": "private",
                        "encrypted": True})
    if r["type"] != "ok":
        raise SystemExit(f"create failed: {r}")
    for c in clients[1:]:
        owner._request({"type": "invite", "room": room, "username": c.name})
        if c._request({"type": "join", "room": room})["type"] != "ok":
            raise SystemExit(f"join failed for {c.name}")
    devices = []
    for c in clients[:10]:
        account = vodozemac.Account()
        keys = {"curve25519": account.curve25519_key.to_base64(), "device": "bench",
                "ed25519": account.ed25519_key.to_base64(), "user": c.name}
        r = c._request({"type": "device_keys", "device": "bench",
                        "curve25519": keys["curve25519"], "ed25519": keys["ed25519"],
                        "signature": account.sign(canonical(keys)).to_base64()})
        if r["type"] != "ok":
            raise SystemExit(f"device_keys failed for {c.name}: {r}")
        devices.append(("bench", keys["curve25519"]))
    run = EncryptedRun(clients, 10, devices, room)
    return _throughput(args, run)


def decrypt_rate(args, ctx) -> dict:
    """A client's side: room messages of 200 characters decrypted per second on one core
    by chat-client's own machinery (chat.client.crypto: the frame's checks, Megolm, the
    replay table written to its SQLite key store), and the same with bare vodozemac."""
    import tempfile

    import vodozemac

    from chat.client.crypto import E2E
    from chat.client.keystore import KeyStore

    n = 5000
    with tempfile.TemporaryDirectory() as tmp:
        alice = E2E(KeyStore.open(Path(tmp) / "a" / "a.sqlite3"), "alice", "A",
                    rotate_after_messages=10 * n)
        bob = E2E(KeyStore.open(Path(tmp) / "b" / "b.sqlite3"), "bob", "B")
        entries = {}
        for m in (alice, bob):
            keys = m.device_keys_request()
            entries[m.user] = [{k: keys[k] for k in ("device", "curve25519", "ed25519",
                                                     "signature")}]
        for m in (alice, bob):
            m.receive_keys({"type": "keys", "users": entries})
        otk = bob.one_time_keys_request(0)["keys"][0]
        bob.keys_published()
        alice.receive_claimed({"type": "claimed", "username": "bob", "device": "B",
                               "key": otk})
        share = alice.prepare("room", [("bob", "B")])
        for seq, entry in enumerate(share.messages, 1):
            bob.receive_to_device({"type": "to_device", "seq": seq, "username": "alice",
                                   "device": "A", "olm": entry["olm"]})
        text = "x" * 200
        frames = [json.dumps({
            "type": "message", "msg_id": i, "ts": "2026-12-06T00:00:00.000Z",
            "username": "alice", "room": "room", "message": "[encrypted]",
            "encrypted": alice.encrypt("room", text)}).encode() for i in range(1, n + 1)]
        cpu0, t0 = self_cpu(), time.perf_counter()
        for data in frames:
            got = bob.decrypt(json.loads(data))
            if got.text != text:
                return {"ok": False, "errors": [f"not decrypted: {got}"]}
        took, cpu = time.perf_counter() - t0, self_cpu() - cpu0
        for m in (alice, bob):
            m.store.close()
    group = vodozemac.GroupSession()
    inbound = vodozemac.InboundGroupSession(group.session_key)
    raw = [group.encrypt(text.encode()).to_base64() for _ in range(n)]
    cpu1 = self_cpu()
    for ct in raw:
        inbound.decrypt(vodozemac.MegolmMessage.from_base64(ct))
    bare = self_cpu() - cpu1
    return {"decrypted": n, "per_s": n / took, "us_each": cpu / n * 1e6,
            "vodozemac_us_each": bare / n * 1e6, "ok": True}


def _parallel(make, n: int, threads: int = 16) -> list:
    """Set up n clients from a few threads: one at a time, TLS and bcrypt round trips
    made setting up 2,000 take over a minute and a half."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(make, range(n)))


def workload_c(args, ctx) -> dict:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    rss0 = proc_rss(args.pid)
    t0 = time.perf_counter()
    # Idle users try to leave `general` (older servers let them; ours keeps everyone in
    # it, and does not announce logins in a room of more than presence_room_limit
    # online): 10,000 logins announced to every member would be 50 million presence
    # frames, which measures presence fan-out, not holding connections.
    idle = _parallel(lambda i: PROTOCOLS[args.proto][0](
        args.port, ctx, f"{args.prefix}idle{i}", register=args.register,
        room=None, leave_general=True), args.idle)
    setup = time.perf_counter() - t0
    # Idle, not dead: like any client, they answer the server's pings.
    sel = selectors.DefaultSelector()
    for c in idle:
        c.go_nonblocking()
        sel.register(c.sock, selectors.EVENT_READ, c)
    pongs = 0
    dead: set[int] = set()

    def answer_pings(seconds: float) -> None:
        nonlocal pongs
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                c = key.data
                try:
                    data = c.sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                if not data or b'"type":"bye"' in data:
                    sel.unregister(c.sock)
                    dead.add(id(c))
                    continue
                if b'"type":"ping"' in data:
                    c.sock.sendall(b'{"type":"pong"}\n')
                    pongs += 1

    answer_pings(2)
    rss1 = proc_rss(args.pid)
    cpu0 = proc_cpu(args.pid)
    pongs0 = pongs
    # A whole idle timeout by default, so the window holds every connection's keepalive
    # ping (a short one could fall between them and read as zero).
    answer_pings(args.idle_seconds)
    idle_cpu = proc_cpu(args.pid) - cpu0
    idle_pongs = pongs - pongs0
    active = connect_all(args, ctx, 10, args.prefix + "act")
    run = Run(active, senders=10, proto=args.proto)
    for k in range(1000):
        run.send(k % 10)
        run.poll(0, measure=False)
    run.drain(30)
    answer_pings(1)
    held = len(idle) - len(dead)
    return {
        "idle_connections": args.idle, "held": held, "setup_s": setup, "pongs": pongs,
        "rss_per_connection_kib": (rss1 - rss0) / args.idle / 1024,
        "server_rss_mib": rss1 / 2**20, "idle_seconds": args.idle_seconds,
        "idle_cpu_percent": idle_cpu / args.idle_seconds * 100, "idle_pongs": idle_pongs,
        "server_us_per_ping": idle_cpu / idle_pongs * 1e6 if idle_pongs else None,
        "active_ok": not run.errors, "errors": run.errors[:5],
        "ok": held == args.idle and not run.errors,
    }


def bcrypt_limit(cost: int) -> tuple[float, float]:
    """(seconds for one hash at `cost`, hashes per second all cores could do)."""
    import bcrypt
    times = []
    for _ in range(3):
        t = time.perf_counter()
        bcrypt.hashpw(b"calibration", bcrypt.gensalt(cost))
        times.append(time.perf_counter() - t)
    one = sorted(times)[1]
    return one, (os.cpu_count() or 1) / one


def workload_d(args, ctx) -> dict:
    """(a) while a second process storms the server with logins at `--storm-rate`/s."""
    hash_s, limit = bcrypt_limit(args.bcrypt_cost)
    storm = subprocess.Popen(
        [sys.executable, __file__, "storm", "--port", str(args.port), "--pid", str(args.pid),
         "--cafile", args.cafile, "--prefix", args.prefix + "s",
         "--seconds", str(args.seconds), "--storm-rate", str(args.storm_rate),
         "--storm-users", str(args.storm_users)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert storm.stdout is not None and storm.stdin is not None
    if storm.stdout.readline().strip() != "READY":  # its users are registered
        raise SystemExit("the storm process did not start")

    def go() -> None:
        storm.stdin.write("go\n")
        storm.stdin.flush()

    chat = workload_a(args, ctx, on_start=go)
    result = json.loads(storm.stdout.read().strip().splitlines()[-1])
    storm.wait(60)
    return {
        **{f"chat_{k}": v for k, v in chat.items() if k not in ("errors", "ok")},
        **result, "bcrypt_cost": args.bcrypt_cost, "bcrypt_hash_s": hash_s,
        "bcrypt_limit_per_s": limit,
        "share_of_limit": result["logins_per_s"] / limit,
        "errors": chat["errors"] + result["errors"], "ok": chat["ok"] and result["ok"],
    }


def storm(args, ctx) -> dict:
    """Logins at a fixed rate from many threads, each a new TLS connection (the storm
    process of workload (d)). Prints READY once its users exist, starts on a line on
    stdin, and counts what the server answered."""
    names = [f"{args.prefix}{i}" for i in range(args.storm_users)]

    def register(name: str) -> None:
        c = _Storm(args.port, ctx)
        r = c.request({"type": "register", "username": name, "password": PASSWORD})
        if r["type"] != "ok" and r.get("code") != "username_taken":
            raise SystemExit(f"register failed for {name}: {r}")
        c.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(register, names))
    print("READY", flush=True)
    sys.stdin.readline()
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    done: list[float] = []

    def attempt(k: int) -> None:
        try:
            c = _Storm(args.port, ctx)
            r = c.request({"type": "login", "username": names[k % len(names)],
                           "password": PASSWORD})
            c.close()
            what = "welcome" if r["type"] == "welcome" else r.get("code", r["type"])
        except (OSError, ValueError) as exc:
            what = type(exc).__name__
        with lock:
            outcomes[what] = outcomes.get(what, 0) + 1
            if what == "welcome":
                done.append(time.perf_counter())

    start = time.perf_counter()
    cpu0 = time.process_time()
    with concurrent.futures.ThreadPoolExecutor(256) as pool:
        k = 0
        while (now := time.perf_counter()) - start < args.seconds:
            due = start + k / args.storm_rate
            if now < due:
                time.sleep(due - now)
                continue
            pool.submit(attempt, k)
            k += 1
        # Its own share of the machine in the window: with the chat generator's and the
        # server's, it shows what the bcrypt workers could have had.
        cpu = time.process_time() - cpu0
    in_window = sum(1 for t in done if t - start <= args.seconds)
    return {
        "attempts": k, "outcomes": outcomes, "logins_per_s": in_window / args.seconds,
        "storm_cpu_s": cpu,
        # Attempts the bounded queue took finish after the storm: their rate, to the last.
        "logins_per_s_to_last": len(done) / (max(done) - start) if done else 0.0,
        "errors": [f"storm: {n} {what}" for what, n in outcomes.items()
                   if what not in ("welcome", "server_busy", "rate_limited")],
        "ok": True,
    }


class _Storm:
    """A blocking one-shot client for the storm."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.sock = _tls_connect(port, ctx)
        self.sock.settimeout(120)
        self._lines = self.sock.makefile("rb")
        json.loads(self._lines.readline())  # hello

    def request(self, frame: dict) -> dict:
        self.sock.sendall(json.dumps({**frame, "id": 1}).encode() + b"\n")
        while True:
            line = self._lines.readline()
            if not line:
                raise ValueError("closed")
            f = json.loads(line)
            if f.get("re") == 1:
                return f

    def close(self) -> None:
        try:
            self.sock.sendall(b'{"type":"quit"}\n')
        except OSError:
            pass
        self.sock.close()


ECHO_RE = re.compile(rb'"msg_id":(\d+),[^\n]*"message":"(\d+):(\d+):\d+","re"')
ROOM_MSG_RE = re.compile(rb'"msg_id":(\d+),[^\n]*?"room":"([^"]+)"')


def workload_e(args, ctx) -> dict:
    """Messages stored per second: each of 50 senders alone in its own room, 20 messages
    unacknowledged, so the server's work is the storing, not the fan-out. With
    --kill-after, the server gets SIGKILL then, and every msg_id a sender saw echoed
    (stored, so acknowledged) is written to --seen-file for `verify`.

    Over several nodes (--port P1,P2,P3): sender i is on node i mod n, and one reader on
    each node is in every sender's room. The kill is the first node's; its clients log
    in again on the others, in turn, and go on to the run's end. Then the readers are
    given `--settle` quiet seconds, and each reader session's msg_ids, per room, go to
    --seen-file too, for `verify` to compare with history."""
    n, window = 50, 20
    ports = args.ports
    cluster = len(ports) > 1
    room = [f"{args.prefix}r{i}" for i in range(n)]
    conns = _parallel(lambda i: Client(ports[i % len(ports)], ctx, f"{args.prefix}{i}",
                                       register=args.register, room=room[i],
                                       leave_general=True), n)
    for k, port in enumerate(ports if cluster else []):
        reader = Client(port, ctx, f"{args.prefix}reader{k}", register=args.register, room=None)
        for r in room:
            if reader._request({"type": "join", "room": r})["type"] != "ok":
                raise SystemExit(f"join failed for {reader.name}")
        conns.append(reader)
    sel = selectors.DefaultSelector()

    def watch(idx: int) -> None:
        conns[idx].go_nonblocking()
        sel.register(conns[idx].sock, selectors.EVENT_READ, idx)

    for idx in range(len(conns)):
        watch(idx)
    live = set(range(len(conns)))
    sent, acked, unacked, expect = [0] * n, [0] * n, [0] * n, [0] * n
    seen: list[list[int]] = [[] for _ in range(n)]
    # Per reader, per session (a new one after a reconnect): room -> msg_ids received.
    streams: list[list[dict[str, list[int]]]] = [[{}] for _ in conns[n:]]
    errors: list[str] = []
    pending: dict[int, bytearray] = {}
    pool = concurrent.futures.ThreadPoolExecutor(16)
    back: dict[concurrent.futures.Future, int] = {}  # logins under way after the kill

    def send(i: int) -> None:
        data = (b'{"type":"send","room":"%sr%d","message":"%d:%d:%d","id":1}\n'
                % (args.prefix.encode(), i, i, sent[i], time.perf_counter_ns()))
        sent[i] += 1
        unacked[i] += 1
        buf = pending.setdefault(i, bytearray())
        buf += data

    def flush() -> None:
        for i, buf in list(pending.items()):
            try:
                k = conns[i].sock.send(buf)
            except ssl.SSLWantWriteError:
                continue
            except OSError:
                pending.pop(i)
                continue
            del buf[:k]
            if not buf:
                del pending[i]

    def closed(idx: int) -> None:
        sel.unregister(conns[idx].sock)
        conns[idx].sock.close()
        live.discard(idx)
        pending.pop(idx, None)
        node = idx % len(ports) if idx < n else idx - n
        if killed_at is None or node != 0:
            errors.append(f"client {idx} closed by node {node + 1}")
        if killed_at is not None and cluster:  # to another node, as behind a balancer
            others = ports[1:]
            back[pool.submit(Client, others[idx % len(others)], ctx, conns[idx].name,
                             register=False, room=None)] = idx

    def returned(fut: concurrent.futures.Future, idx: int) -> None:
        try:
            conns[idx] = fut.result()
        except (OSError, SystemExit, ValueError) as exc:
            errors.append(f"client {idx} could not log in again: {exc}")
            return
        watch(idx)
        live.add(idx)
        if idx < n:  # what was in flight at the kill is not waited for
            unacked[idx], expect[idx] = 0, sent[idx]
        else:
            streams[idx - n].append({})

    killed_at = back_at = server_cpu = None
    start = last_frame = time.perf_counter()
    cpu0 = cpu_of(args.pids)
    stored_in_window = 0
    while True:
        elapsed = time.perf_counter() - start
        if killed_at is None and args.kill_after and elapsed >= args.kill_after:
            server_cpu = cpu_since(cpu0)
            os.kill(args.pids[0], signal.SIGKILL)
            killed_at = elapsed
        sending = elapsed < args.seconds and (killed_at is None or cluster)
        if not sending and not cluster and (killed_at is None or not live
                                            or elapsed >= args.seconds + 10):
            break
        if not sending and cluster and (elapsed >= args.seconds + 30 or (
                not back and not any(unacked)
                and time.perf_counter() - last_frame >= args.settle)):
            break
        for fut in [f for f in back if f.done()]:
            returned(fut, back.pop(fut))
            if not back:
                back_at = time.perf_counter() - start
        if sending:
            for i in range(n):
                while i in live and unacked[i] < window:
                    send(i)
            flush()
        for key, _ in sel.select(0.01):
            idx = key.data
            lines, gone = read_lines(conns[idx])
            if idx < n:
                for mid, s_, q in ECHO_RE.findall(lines):
                    if int(s_) != idx or int(q) != expect[idx]:
                        errors.append(f"sender {idx}: echo {int(s_)}:{int(q)} after "
                                      f"{expect[idx] - 1}")
                    expect[idx] = int(q) + 1
                    acked[idx] += 1
                    unacked[idx] = max(0, unacked[idx] - 1)
                    seen[idx].append(int(mid))
                    if killed_at is None:
                        stored_in_window += 1
            else:
                session = streams[idx - n][-1]
                for mid, r in ROOM_MSG_RE.findall(lines):
                    session.setdefault(r.decode(), []).append(int(mid))
                    last_frame = time.perf_counter()
            if b'"type":"error"' in lines:
                errors.append(f"client {idx}: {lines[:200]!r}")
            if gone:
                closed(idx)
    pool.shutdown(wait=False, cancel_futures=True)
    if back:
        errors.append(f"{len(back)} clients not logged in again by the end")
    took = killed_at if killed_at is not None else time.perf_counter() - start
    if server_cpu is None:
        server_cpu = cpu_since(cpu0)
    if args.seen_file:
        Path(args.seen_file).write_text(json.dumps({
            "rooms": {room[i]: {"user": conns[i].name, "ids": seen[i]} for i in range(n)},
            "readers": [{"user": conns[n + k].name, "sessions": s}
                        for k, s in enumerate(streams)]}))
    for c in conns:
        c.sock.close()
    return {
        "stored_per_s": stored_in_window / took, "stored": sum(acked),
        "server_us_per_message": server_cpu / stored_in_window * 1e6 if stored_in_window else None,
        "killed_at_s": killed_at, "seconds": took, "nodes": len(ports),
        "back_after_s": back_at - killed_at if back_at and killed_at else None,
        "errors": errors[:5], "ok": not errors,
    }


def verify(args, ctx) -> dict:
    """After the kill (a restart, on one node): every acknowledged msg_id is in history,
    and no message (msg_id, or sender and sequence number) is in it twice. With readers
    (several nodes), each reader session's stream of a room must be in order, once each,
    and hold every stored message from its first to its last; the first session from the
    room's first message, the last to the room's last."""
    saw = json.loads(Path(args.seen_file).read_text())
    missing = extra = checked = doubled = 0
    errors: list[str] = []
    history: dict[str, list[int]] = {}
    for room, entry in sorted(saw["rooms"].items()):
        ids = entry["ids"]
        c = Client(args.port, ctx, entry["user"], register=False, room=None)
        stored: list[int] = []
        texts: list[str] = []
        after = 0
        while True:
            h = c._request({"type": "history", "room": room, "after": after, "limit": 200})
            if not h["messages"]:
                break
            stored += [m["msg_id"] for m in h["messages"]]
            texts += [m["message"].rsplit(":", 1)[0] for m in h["messages"]]
            after = stored[-1]
        history[room] = stored
        twice = len(stored) - len(set(stored)) + len(texts) - len(set(texts))
        if twice:
            errors.append(f"{room}: {twice} messages twice in history")
        doubled += twice
        lost = set(ids) - set(stored)
        missing += len(lost)
        extra += len(stored) - len(set(ids) & set(stored))
        checked += len(ids)
        if lost:
            errors.append(f"{room}: {len(lost)} acknowledged messages missing, e.g. {min(lost)}")
        c.sock.close()
    r_checked = r_missing = r_doubled = 0
    for reader in saw.get("readers", []):
        sessions = reader["sessions"]
        for j, session in enumerate(sessions):
            for room, stored in history.items():
                got = session.get(room, [])
                if got != sorted(set(got)):
                    r_doubled += len(got) - len(set(got))
                    errors.append(f"{reader['user']} session {j}: {room} out of order or twice")
                if not stored or (not got and len(sessions) > 1):
                    continue  # nothing to place it: what it missed is a catch-up's
                low = stored[0] if j == 0 else got[0]
                high = stored[-1] if j == len(sessions) - 1 else got[-1]
                want = {m for m in stored if low <= m <= high}
                lost = want - set(got)
                r_checked += len(want)
                r_missing += len(lost)
                if lost:
                    errors.append(f"{reader['user']} session {j}: {len(lost)} of {room} "
                                  f"missing, e.g. {min(lost)}")
    # `extra`: stored but never seen acknowledged, the messages in flight at the kill
    # whose echo was lost with the server; allowed, since no one was told they were stored.
    return {"acknowledged": checked, "missing": missing, "stored_unacknowledged": extra,
            "doubled": doubled, "reader_deliveries": r_checked, "reader_missing": r_missing,
            "reader_doubled": r_doubled, "errors": errors[:5], "ok": not errors}


PROTOCOLS.update({
    "chat": (Client, encode_send, MSG_RE, True),
    "irc": (IrcClient, encode_irc, IRC_RE, False),
})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["a", "b", "be", "decrypt", "c", "d", "e", "verify",
                                         "storm", "f"])
    ap.add_argument("--port", required=True, help="(f) one per node, comma-separated")
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--pid", required=True,
                    help="the server's process id; (f) one per node, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--idle-seconds", type=float, default=120.0,
                    help="(c) the idle window; by default the server's idle timeout")
    ap.add_argument("--prefix", default="bench")
    ap.add_argument("--no-register", dest="register", action="store_false")
    ap.add_argument("--proto", choices=["chat", "irc"], default="chat")
    ap.add_argument("--storm-rate", type=float, default=100.0, help="(d) logins per second")
    ap.add_argument("--storm-users", type=int, default=50, help="(d) accounts the storm uses")
    ap.add_argument("--bcrypt-cost", type=int, default=12, help="(d) the server's cost")
    ap.add_argument("--kill-after", type=float, default=0.0, help="(e) SIGKILL the server then")
    ap.add_argument("--seen-file", help="(e) where to write, (verify) where to read, the ids")
    ap.add_argument("--rates", default="50,200",
                    help="(f) messages/s offered for the latency, comma-separated")
    ap.add_argument("--pg-db", help="(f) the database whose PostgreSQL backends to measure")
    ap.add_argument("--redis-pid", type=int, help="(f) the Redis server's process id")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="(e) over several nodes: quiet seconds the readers get at the end")
    args = ap.parse_args()
    args.ports = [int(p) for p in args.port.split(",")]
    args.pids = [int(p) for p in args.pid.split(",")]
    args.port, args.pid = args.ports[0], args.pids[0]
    args.rates = [float(r) for r in args.rates.split(",")]
    ctx = tls.client_context(args.cafile)
    result = {"a": workload_a, "b": workload_b, "be": workload_be, "decrypt": decrypt_rate,
              "c": workload_c, "d": workload_d,
              "e": workload_e, "verify": verify, "storm": storm,
              "f": workload_f}[args.workload](args, ctx)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
