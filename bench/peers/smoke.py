"""End-to-end check of one peer server, as the benchmark will use it.

    python bench/peers/smoke.py NAME [--cafile ca.crt --cert server.crt --key server.key]

Starts NAME with start.py (fresh dev certificates from chat.certs unless given), connects
three TLS clients (verified against the CA, server_hostname "localhost"), registers them,
joins #bench, sends 100 PRIVMSGs from the first and checks that the other two receive all
100, in order. Then stops start.py with SIGTERM and checks the server process is gone.
It also reports how the server packs lines into TLS records (records per received line)
by reading the raw TCP stream under an ssl.MemoryBIO. Every wait is bounded.
Exit status 0 when everything checked out.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from irc import IrcParser, join_line, privmsg_line, register_lines  # noqa: E402

CHANNEL = "#bench"
MESSAGES = 100
TIMEOUT = 20.0


class TlsClient:
    """Blocking TLS over a MemoryBIO, so the raw records can be counted."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.parser = IrcParser()
        self.records = 0  # application-data records (type 23) seen
        self.record_bytes = 0
        self._hdr = b""  # partial record header
        self._skip = 0  # bytes of the current record body still to come
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._read_raw(deadline)
        self._flush()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _count(self, raw: bytes) -> None:
        i, n = 0, len(raw)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            need = 5 - len(self._hdr)
            self._hdr += raw[i : i + need]
            i += need
            if len(self._hdr) == 5:
                length = int.from_bytes(self._hdr[3:5], "big")
                if self._hdr[0] == 23:
                    self.records += 1
                    self.record_bytes += length
                self._skip = length
                self._hdr = b""

    def _read_raw(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from server")
        self.sock.settimeout(left)
        raw = self.sock.recv(65536)
        if not raw:
            raise ConnectionError("server closed the connection")
        self._count(raw)
        self.inc.write(raw)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def events(self, deadline: float) -> list[tuple[str, str, str]]:
        """Whatever complete lines can be had now; waits for at least some data."""
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._read_raw(deadline)
                continue
            if not data:
                raise ConnectionError("TLS closed")
            evs = self.parser.feed(data)
            pong = self.parser.take_outgoing()
            if pong:
                self.send(pong)
            return evs

    def wait_for(self, pred, what: str) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + TIMEOUT
        got = []
        while not pred():
            got += self.events(deadline)
        return got

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def start_peer(name: str, cert: Path, key: Path) -> tuple[subprocess.Popen, int, int, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "start.py"), name, "--cert", str(cert), "--key", str(key)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 90)
    line = proc.stdout.readline() if ready else ""
    parts = line.split()
    if len(parts) != 4 or parts[0] != "READY" or parts[1] != name:
        proc.kill()
        proc.wait(timeout=10)
        raise SystemExit(f"smoke: {name}: no READY line (got {line!r})")
    return proc, int(parts[2]), int(parts[3]), time.monotonic() - t0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (only its parent can reap it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def nodelay_report(pid: int, port: int) -> str:
    """TCP_NODELAY (Nagle off) on the server's accepted sockets, read from the server's own
    file descriptors (pidfd_getfd, Linux 5.6+, needs ptrace rights: root or same user)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError) as e:
        return f"unknown ({e})"
    seen = {}
    try:
        for fd_name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd_name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(fd_name), 0)  # SYS_pidfd_getfd
            if fd < 0:
                return f"unknown (pidfd_getfd: errno {ctypes.get_errno()})"
            try:
                s = socket.socket(fileno=fd)
                try:
                    if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                        continue
                    local, peer = s.getsockname(), None
                    try:
                        peer = s.getpeername()
                    except OSError:
                        pass
                    if local[1] != port or peer is None:
                        continue  # the listener, or not one of our connections
                    seen[peer] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                finally:
                    s.detach()
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    if not seen:
        return "unknown (no connected sockets found)"
    values = set(bool(v) for v in seen.values())
    if values == {True}:
        return f"TCP_NODELAY set on all {len(seen)} client sockets (Nagle off)"
    if values == {False}:
        return f"TCP_NODELAY not set on {len(seen)} client sockets (Nagle on)"
    return f"mixed TCP_NODELAY on {len(seen)} client sockets"


def run(name: str, cafile: Path, cert: Path, key: Path, burst: bool = False) -> bool:
    proc, port, pid, t_ready = start_peer(name, cert, key)
    print(f"{name}: READY on port {port}, pid {pid}, after {t_ready:.2f}s")
    ok = True
    clients: list[TlsClient] = []
    try:
        ctx = ssl.create_default_context(cafile=str(cafile))
        for i in range(3):
            c = TlsClient(port, ctx)
            clients.append(c)
            nick = f"smoke{i}"
            t = time.monotonic()
            c.send(register_lines(nick))
            c.wait_for(lambda c=c: c.parser.registered, "001")
            t_reg = time.monotonic() - t
            t = time.monotonic()
            c.send(join_line(CHANNEL))
            c.wait_for(lambda c=c: c.parser.is_joined(CHANNEL), "366")
            t_join = time.monotonic() - t
            print(
                f"  {nick}: {c.tls.version()} {c.tls.cipher()[0]}; 001 after {t_reg * 1000:.0f} ms,"
                f" 366 after {t_join * 1000:.1f} ms"
            )
        print(f"  server sockets: {nodelay_report(pid, port)}")
        sender, receivers = clients[0], clients[1:]
        # Let the JOIN notices of later clients reach the earlier ones, then count afresh.
        time.sleep(0.2)
        for c in clients:
            c.sock.settimeout(0.05)
            try:
                while True:
                    c.events(time.monotonic() + 0.05)
            except TimeoutError:
                pass
            c.records = c.record_bytes = 0
        t = time.monotonic()
        lines_out = [privmsg_line(CHANNEL, f"msg {i:03d} from smoke0") for i in range(MESSAGES)]
        if burst:  # all 100 lines in one write (one ~3 KB TLS record)
            sender.send(b"".join(lines_out))
        else:  # one TLS record per line, sent back to back
            for line in lines_out:
                sender.send(line)
        for r in receivers:
            got: list[str] = []
            deadline = time.monotonic() + TIMEOUT
            lines_before = r.parser.lines
            while len(got) < MESSAGES and time.monotonic() < deadline:
                try:
                    evs = r.events(deadline)
                except TimeoutError:
                    break
                got += [text for cmd, nick, text in evs if cmd == "PRIVMSG" and nick == "smoke0"]
            want = [f"msg {i:03d} from smoke0" for i in range(MESSAGES)]
            lines = r.parser.lines - lines_before
            verdict = "OK" if got == want else "FAIL"
            ok &= got == want
            in_order = got == want[: len(got)]
            print(
                f"  {r.parser.nick}: {len(got)}/{MESSAGES} PRIVMSGs, in order: {in_order}"
                f" ({verdict}); {lines} lines in {r.records} TLS records"
                f" ({r.records / max(lines, 1):.2f} records/line,"
                f" {r.record_bytes / max(r.records, 1):.0f} B/record);"
                f" all in {time.monotonic() - t:.3f}s"
            )
        if sender.parser.errors or any(r.parser.errors for r in receivers):
            print("  errors:", [c.parser.errors for c in clients])
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print("  start.py did not exit after SIGTERM: killing it")
            proc.kill()
            proc.wait(timeout=10)
            ok = False
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        print(f"  FAIL: server pid {pid} still running after stop")
        ok = False
    else:
        print(f"  stopped: start.py exit {proc.returncode}, server pid {pid} gone")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", choices=("ngircd", "inspircd", "miniircd"))
    ap.add_argument("--cafile", type=Path)
    ap.add_argument("--cert", type=Path)
    ap.add_argument("--key", type=Path)
    ap.add_argument(
        "--burst",
        action="store_true",
        help="send the 100 PRIVMSGs in one write instead of one write each",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peer-smoke-") as tmp:
        if args.cafile and args.cert and args.key:
            cafile, cert, key = args.cafile, args.cert, args.key
        else:
            subprocess.run(
                [sys.executable, "-m", "chat.certs", "--out", tmp],
                cwd=REPO,
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=60,
            )
            cafile, cert, key = (
                Path(tmp, "ca.crt"),
                Path(tmp, "server.crt"),
                Path(tmp, "server.key"),
            )
        results = {name: run(name, cafile, cert, key, args.burst) for name in args.names}
    print(" ".join(f"{n}={'ok' if r else 'FAIL'}" for n, r in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
