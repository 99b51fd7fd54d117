"""Start one real IRC server ("peer") on loopback with TLS, for side-by-side benchmarks.

    python bench/peers/start.py NAME --cert CERT --key KEY [--workdir DIR]

NAME is ngircd, inspircd or miniircd (install them first: bench/peers/install.sh).

What it does:
- picks a free loopback TCP port (binds 127.0.0.1:0, reads the port, closes it);
- writes a config for NAME into the work dir (a fresh temporary directory unless --workdir
  is given): TLS only on that port, no plaintext port, flood protection / penalties off,
  limits sized for 10,000 clients in one channel, no DNS or ident lookups, a one-line MOTD;
- starts the server in the foreground as a child process (never daemonized), with its
  output going to DIR/NAME.log;
- waits (bounded by --timeout) until the port completes a TLS handshake, then prints exactly
  one line to stdout:  READY NAME PORT PID   (PID is the server's, not this script's);
- runs until SIGTERM or SIGINT, then stops the server (SIGTERM, then SIGKILL after a grace
  period) and removes the work dir if it made it. If the server dies on its own, this script
  exits non-zero and prints the end of its log to stderr.

Only 127.0.0.1 is ever listened on. Diagnostics go to stderr; stdout carries only READY.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ("ngircd", "inspircd", "miniircd")
HOST = "127.0.0.1"
MINIIRCD_VENV = HERE / ".venv-miniircd"
NGIRCD = "/usr/sbin/ngircd"
INSPIRCD = "/usr/sbin/inspircd"

# Sized for the benchmark: 10,000 clients, all from 127.0.0.1, all in one channel.
CLIENTS = 10_000
NOFILE_WANTED = 65_536  # fds for 10k clients plus listeners, logs and slack
MOTD = "bench"

# A SIGSEGV while InspIRCd exits: Debian's 3.15.0 build crashes in InspIRCd::Exit() after
# unloading m_ssl_gnutls (calls into the unloaded module). It happens after every socket is
# closed, so it is reported but not treated as a failure.
INSPIRCD_EXIT_CRASH = -signal.SIGSEGV


def log(msg: str) -> None:
    print(f"start.py: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    """Let the child (which inherits our limits) hold 10k+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE_WANTED, hard) if os.geteuid() == 0 else hard
    for new_hard in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, new_hard)), new_hard))
            break
        except (ValueError, OSError):
            continue
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CLIENTS + 100:
        log(f"warning: RLIMIT_NOFILE is {soft}; fewer than {CLIENTS} clients will fit")


# --------------------------------------------------------------------------- configs


def ngircd_config(work: Path, port: int, cert: Path, key: Path) -> list[str]:
    conf = work / "ngircd.conf"
    include = work / "ngircd.conf.d"  # empty: keeps /etc/ngircd/ngircd.conf.d out
    include.mkdir(exist_ok=True)
    lines = [
        "[Global]",
        "\tName = ngircd.bench.local",
        "\tInfo = bench peer",
        "\tAdminInfo1 = bench",
        "\tAdminInfo2 = bench",
        "\tAdminEMail = bench@localhost",
        f"\tListen = {HOST}",
        "\tPorts =",  # empty list: no plaintext listener at all
        f"\tMotdPhrase = {MOTD}",
        "\tHelpFile =",
    ]
    if os.geteuid() == 0:
        # ngIRCd refuses to keep running as root and switches to "nobody" anyway; say so
        # explicitly. It reads the key and the config before it drops privileges.
        lines += ["\tServerUID = nobody", "\tServerGID = nogroup"]
    lines += [
        "[Limits]",
        "\tMaxConnections = 0",  # unlimited
        "\tMaxConnectionsIP = 0",  # unlimited: every client comes from 127.0.0.1
        "\tMaxJoins = 0",  # unlimited channels per user
        "\tMaxNickLength = 30",
        "\tMaxListSize = 100",
        # 0 disables penalties: every per-command / per-bps penalty (Conn_SetPenalty) adds
        # 0 seconds instead of 1-2, so no client is ever delayed for sending fast.
        "\tMaxPenaltyTime = 0",
        "\tPingTimeout = 600",
        "\tPongTimeout = 120",  # also the registration timeout for unregistered clients
        "\tIdleTimeout = 0",
        "[Options]",
        "\tDNS = no",
        "\tIdent = no",
        "\tPAM = no",
        "\tNoticeBeforeRegistration = no",
        "\tRequireAuthPing = no",
        "\tMorePrivacy = no",
        "\tScrubCTCP = no",
        f"\tIncludeDir = {include}",
        "[SSL]",
        f"\tCertFile = {cert}",
        f"\tKeyFile = {key}",
        f"\tPorts = {port}",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return [NGIRCD, "--nodaemon", "--passive", "--config", str(conf)]


def inspircd_config(work: Path, port: int, cert: Path, key: Path) -> list[str]:
    conf = work / "inspircd.conf"
    (work / "motd.txt").write_text(MOTD + "\n")
    big = 1_000_000
    conf.write_text(f"""\
<config format="xml">
<server name="inspircd.bench.local" description="bench peer" network="bench">
<admin name="bench" nick="bench" email="bench@localhost">
<path configdir="{work}" datadir="{work}" logdir="{work}" runtimedir="{work}">
<pid file="{work}/inspircd.pid">
<files motd="{work}/motd.txt">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="sparse" target="{work}/ircd.log">

<module name="ssl_gnutls">
<sslprofile name="bench" provider="gnutls" certfile="{cert}" keyfile="{key}"
            dhfile="" hash="sha256" requestclientcert="no">
<bind address="{HOST}" port="{port}" type="clients" sslprofile="bench">

# One class for everyone. Flood control off: fakelag="no" and a threshold and a
# commandrate so large that the per-command penalty can never reach the threshold
# (threshold*1000 = 1e9 penalty units; commandrate = 1e9 millicommands/s drains it
# every second). Queues big enough that a busy 10k-member channel does not trip
# "SendQ exceeded" / "RecvQ exceeded". No DNS, no ident.
<connect name="bench" allow="*" maxchans="100" timeout="120" pingfreq="10m"
         hardsendq="64M" softsendq="16M" recvq="1M"
         threshold="{big}" commandrate="1000000000" fakelag="no"
         localmax="{big}" globalmax="{big}" maxconnwarn="no" limit="{big}"
         resolvehostnames="no" useident="no">
<cidr ipv4clone="32" ipv6clone="128">
<dns server="127.0.0.1" timeout="1">

<options defaultmodes="nt">
<performance netbuffersize="65536" somaxconn="4096" softlimit="{NOFILE_WANTED}"
             clonesonconnect="no" quietbursts="yes">
<limits maxnick="30" maxchan="64">
<channels users="100" opers="100">
""")
    return [INSPIRCD, "--nofork", "--runasroot", f"--config={conf}"]


MINIIRCD_SHIM = HERE / "miniircd_shim.py"


def miniircd_command(work: Path, port: int, cert: Path, key: Path, stock: bool) -> list[str]:
    motd = work / "motd.txt"
    motd.write_text(MOTD + "\n")
    python = MINIIRCD_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"start.py: {python} missing: run bench/peers/install.sh")
    entry = ["-m", "miniircd"] if stock else [str(MINIIRCD_SHIM)]
    # miniircd has no flood control and no DNS/ident at all; it has no limits to raise.
    cmd = [
        str(python),
        *entry,
        "--listen",
        HOST,
        "--ports",
        str(port),
        "--ssl-cert-file",
        str(cert),
        "--ssl-key-file",
        str(key),
        "--motd",
        str(motd),
    ]
    if os.geteuid() == 0:
        cmd += ["--setuid", "root"]  # miniircd's own spelling of "yes, stay root"
    return cmd


# --------------------------------------------------------------------------- running


def _child_setup() -> None:
    """In the child, before exec: no core files; die with us if we die (best effort:
    Linux clears this when the child changes uid, as ngIRCd does)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def tls_handshake_ok(port: int, timeout: float) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only "does it answer TLS"; the caller verifies the CA
    try:
        with (
            socket.create_connection((HOST, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def tail(path: Path, n: int = 30, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-n:])
    except OSError:
        return "(no log)"


class Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=PEERS)
    ap.add_argument("--cert", required=True, type=Path, help="server certificate (PEM)")
    ap.add_argument("--key", required=True, type=Path, help="server private key (PEM)")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="where config and log go (kept); default: a temp dir, removed at exit",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the TLS port to answer (default 60)",
    )
    ap.add_argument(
        "--stock-miniircd",
        action="store_true",
        help="run miniircd unpatched (select(): at most ~1000 clients)",
    )
    args = ap.parse_args(argv)

    cert, key = args.cert.resolve(), args.key.resolve()
    for p in (cert, key):
        if not p.is_file():
            ap.error(f"{p} is not a file")
    binary = {"ngircd": NGIRCD, "inspircd": INSPIRCD}.get(args.name)
    if binary and not os.access(binary, os.X_OK):
        ap.error(f"{binary} missing: run bench/peers/install.sh")

    made_workdir = args.workdir is None
    if made_workdir:
        work = Path(tempfile.mkdtemp(prefix=f"peer-{args.name}-"))
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    if args.name == "ngircd" and os.geteuid() == 0:
        # ngIRCd runs as nobody; it needs no writes, but let it look around its dir.
        os.chmod(work, 0o755)

    # Turn SIGTERM/SIGINT into an exception so every path below cleans up.
    def on_signal(signum, frame):
        raise Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    raise_nofile()
    logpath = work / f"{args.name}.log"
    child: subprocess.Popen | None = None
    try:
        for attempt in range(3):  # a port can be taken between free_port() and the bind
            port = free_port()
            if args.name == "ngircd":
                cmd = ngircd_config(work, port, cert, key)
            elif args.name == "inspircd":
                cmd = inspircd_config(work, port, cert, key)
            else:
                cmd = miniircd_command(work, port, cert, key, args.stock_miniircd)
            with open(logpath, "ab") as logf:
                log_start = logf.tell()
                child = subprocess.Popen(
                    cmd,
                    cwd=work,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_child_setup,
                )
            deadline = time.monotonic() + args.timeout
            ready = False
            while time.monotonic() < deadline:
                if child.poll() is not None:
                    break
                if tls_handshake_ok(port, timeout=2.0):
                    ready = True
                    break
                time.sleep(0.05)
            if ready:
                break
            if child.poll() is None:  # timed out while still running
                log(f"{args.name} did not answer TLS on port {port} within {args.timeout}s")
                log(tail(logpath))
                return 1
            log(
                f"{args.name} exited with {child.returncode} before it was ready "
                f"(attempt {attempt + 1}/3); log:\n{tail(logpath, start=log_start)}"
            )
            child = None
        else:
            return 1

        print(f"READY {args.name} {port} {child.pid}", flush=True)
        log(f"config and log in {work}" + (" (removed at exit)" if made_workdir else ""))
        while True:  # until a signal, or the server dies on its own
            try:
                code = child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
            log(f"{args.name} exited on its own with {code}; log:\n{tail(logpath)}")
            child = None
            return 1
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{args.name} ignored SIGTERM for 10s: SIGKILL")
                child.kill()
                child.wait(timeout=10)
        if child is not None:
            code = child.returncode
            if args.name == "inspircd" and code == INSPIRCD_EXIT_CRASH:
                log("inspircd stopped (its known SIGSEGV at exit, after closing all sockets)")
            elif code not in (0, -signal.SIGTERM):
                # It was asked to stop; how it exits is reported, not a failure of ours.
                log(f"{args.name} stopped with exit code {code}")
            try:  # anything the server forked into its session (resolver helpers)
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if made_workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
