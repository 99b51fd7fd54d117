"""Start each server, run the workloads against it, stop it, print one table.

    bench/run.sh [--runs 3] [--seconds 10] [--idle 10000] [--servers chat,naive]
                 [--workloads a,b,be,c,d,e]

Our server runs with its flood limits raised (the documented benchmark settings: frame
rate, connections and registrations per address, failed logins per address), since the
peers run with theirs off; everything else is default, bcrypt cost 12 included, except
workload (c), which registers its many users at cost 4 (stated in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable

PEERS = ("ngircd", "inspircd", "miniircd")
BENCH_LIMITS = [
    "--frames-per-second", "1000000", "--frame-burst", "1000000",
    "--read-bytes-per-second", "1000000000",
    "--max-connections-per-ip", "100000", "--registrations-per-ip", "1000000",
    "--login-ip-failures", "1000000", "--log-level", "WARNING",
]


def _limits_for(python: str, code: Path) -> list[str]:
    """BENCH_LIMITS less the flags an older checkout's server does not know."""
    out = subprocess.run([python, "-m", "chat.server", "--help"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(code)},
                         cwd=str(code)).stdout
    kept = []
    for flag, value in zip(BENCH_LIMITS[::2], BENCH_LIMITS[1::2], strict=True):
        if flag in out:
            kept += [flag, value]
    return kept


def start(kind: str, certs: Path, data: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    code, python = REPO, PY
    if kind.startswith("chat@"):
        # Another checkout of this server (a git worktree of an older commit, say), run
        # beside this one for a before/after within one run, with its own virtualenv:
        # an editable install maps chat.migrations to its own checkout's migrations.
        code, kind = Path(kind[len("chat@"):]).resolve(), "chat"
        python = str(code / ".venv" / "bin" / "python")
        if not Path(python).exists():
            raise SystemExit(f"{python} is missing: run {code}/scripts/test once")
    if kind == "chat":
        limits = BENCH_LIMITS if code == REPO else _limits_for(python, code)
        cmd = [python, "-m", "chat.server", "--port", "0", "--data-dir", str(data),
               "--certfile", str(certs / "server.crt"), "--keyfile", str(certs / "server.key"),
               *limits, *extra]
    elif kind in PEERS:
        cmd = [PY, str(BENCH / "peers" / "start.py"), kind, "--cert", str(certs / "server.crt"),
               "--key", str(certs / "server.key"), "--workdir", str(data)]
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                _, _, port, pid = line.split()
                proc.server_pid = int(pid)  # type: ignore[attr-defined]
                return proc, int(port)
        raise SystemExit(f"{kind} did not start")
    elif kind == "naive":
        cmd = [PY, str(BENCH / "naive_server.py"), "--port", "0",
               "--certfile", str(certs / "server.crt"), "--keyfile", str(certs / "server.key")]
    else:
        raise SystemExit(f"unknown server {kind}")
    env = {**os.environ, "PYTHONPATH": str(code)}
    # chat-server prints its ready line whatever the log level: wait for it.
    # `python -m` looks in the working directory first: run it in the checkout it is for.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=str(code))
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"listening on [^ ]+:(\d+)", line):
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit(f"{kind} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def loadgen(workload: str, port: int, pid: int, cafile: Path, prefix: str, proto: str,
            **opts) -> dict:
    cmd = [PY, str(BENCH / "loadgen.py"), workload, "--port", str(port), "--pid", str(pid),
           "--cafile", str(cafile), "--prefix", prefix, "--proto", proto]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "errors": [out.stderr[-500:]]}


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}..{format(max(values), fmt)})")


def calibrate() -> dict:
    """How fast this machine is today, so runs on different days can be compared."""
    import timeit

    import bcrypt
    loop_us = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    t = time.perf_counter()
    bcrypt.hashpw(b"calibration", bcrypt.gensalt(12))
    return {"sum_range_1000_us": loop_us, "bcrypt12_s": time.perf_counter() - t}


def run_e(certs: Path, tmp: Path, runs: int, seconds: float) -> dict:
    """(e): stored/s on fresh servers, then one run killed with SIGKILL half way, the
    server restarted on the same data, and every acknowledged message looked for."""
    stored = []
    for run in range(runs):
        proc, port = start("chat", certs, tmp / f"chat-e-{run}", [])
        try:
            stored.append(loadgen("e", port, proc.pid, certs / "ca.crt", f"e{run}x", "chat",
                                  seconds=seconds))
        finally:
            stop(proc)
        print(f"chat e run {run}: {stored[-1]}", file=sys.stderr)
    data, seen = tmp / "chat-e-kill", tmp / "seen.json"
    proc, port = start("chat", certs, data, [])
    try:
        killed = loadgen("e", port, proc.pid, certs / "ca.crt", "ek", "chat",
                         seconds=seconds, **{"kill-after": seconds / 2, "seen-file": seen})
    finally:
        proc.wait(30)
    proc, port = start("chat", certs, data, [])
    try:
        check = loadgen("verify", port, proc.pid, certs / "ca.crt", "ek", "chat",
                        **{"seen-file": seen})
    finally:
        stop(proc)
    print(f"chat e kill: {killed} / verify: {check}", file=sys.stderr)
    return {"runs": stored, "killed": killed, "verify": check}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--idle", type=int, default=10000, help="(c) idle connections; 0 skips")
    ap.add_argument("--idle-seconds", type=float, default=120,
                    help="(c) how long they idle: by default one idle timeout, which holds "
                    "every connection's keepalive ping")
    ap.add_argument("--servers", default="chat,naive,ngircd,inspircd,miniircd",
                    help="comma-separated; the IRC peers need bench/peers/install.sh first; "
                    "chat@PATH is our server from another checkout (before/after)")
    ap.add_argument("--workloads", default="a,b,c,d,e",
                    help="(c), (d) and (e) run against our server only")
    args = ap.parse_args()
    workloads = set(args.workloads.split(","))
    cal = calibrate()
    rows = []
    extra: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = tmp / "certs"
        subprocess.run([PY, "-m", "chat.certs", "--out", str(certs)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        kinds = args.servers.split(",")
        results = {kind: {"a": [], "b": [], "be": []} for kind in kinds}
        # Runs outermost: each server's runs are spread over the whole session, so a
        # slow minute of the machine does not fall on one server only.
        for run in range(args.runs):
            for kind in kinds:
                for w in ("a", "b", "be"):
                    # (be), (b) in an encrypted room, needs our protocol's e2e feature.
                    if w not in workloads or (w == "be" and kind in (*PEERS, "naive")):
                        continue
                    label = kind.replace("/", "_").replace("@", "_")
                    proc, port = start(kind, certs, tmp / f"{label}-{w}-{run}", [])
                    pid = getattr(proc, "server_pid", proc.pid)
                    proto = "irc" if kind in PEERS else "chat"
                    try:
                        results[kind][w].append(loadgen(
                            w, port, pid, certs / "ca.crt", f"{w}{run}x", proto,
                            seconds=args.seconds))
                    finally:
                        stop(proc)
                    print(f"{kind} {w} run {run}: {results[kind][w][-1]}", file=sys.stderr)
        for kind in kinds:
            rows.append((kind, results[kind]))
            if kind != "chat":
                continue
            if "c" in workloads and args.idle:
                proc, port = start(kind, certs, tmp / "chat-c", ["--bcrypt-rounds", "4"])
                try:
                    extra["c"] = loadgen("c", port, proc.pid, certs / "ca.crt", "c", "chat",
                                         idle=args.idle, idle_seconds=args.idle_seconds)
                finally:
                    stop(proc)
                print(f"chat c: {extra['c']}", file=sys.stderr)
            if "d" in workloads:
                extra["d"] = []
                for run in range(args.runs):
                    proc, port = start(kind, certs, tmp / f"chat-d-{run}", [])
                    try:
                        extra["d"].append(loadgen("d", port, proc.pid, certs / "ca.crt",
                                                  f"d{run}x", "chat", seconds=args.seconds))
                    finally:
                        stop(proc)
                    print(f"chat d run {run}: {extra['d'][-1]}", file=sys.stderr)
            if "e" in workloads:
                extra["e"] = run_e(certs, tmp, args.runs, args.seconds)
        if "be" in workloads:  # the client's side: no server needed
            extra["decrypt"] = loadgen("decrypt", 0, os.getpid(), certs / "ca.crt", "x", "chat")
    print_tables(args, cal, rows, extra)
    return 0


def print_tables(args, cal: dict, rows: list, extra: dict) -> None:
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"median (min..max) of {args.runs} runs of {args.seconds:g} s. Calibration: "
          f"sum(range(1000)) {cal['sum_range_1000_us']:.1f} µs, one bcrypt hash at cost 12 "
          f"{cal['bcrypt12_s'] * 1000:.0f} ms\n")
    print("| server | (a) p50 ms | (a) p99 ms | (a) max ms | (a) p99 of first receipt ms | "
          "(a) generator CPU s | (b) deliveries/s | (b) server µs/delivery | "
          "(b) generator CPU s | all ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, res in rows:
        a, b = res["a"], res["b"]
        ok = all(r.get("ok") for r in a + b)
        print(f"| {kind} | {spread([r.get('p50_ms') for r in a], '.2f')} | "
              f"{spread([r.get('p99_ms') for r in a], '.2f')} | "
              f"{spread([r.get('max_ms') for r in a], '.1f')} | "
              f"{spread([r.get('first_p99_ms') for r in a], '.2f')} | "
              f"{spread([r.get('generator_cpu_s') for r in a], '.1f')} | "
              f"{spread([r.get('deliveries_per_s') for r in b], ',.0f')} | "
              f"{spread([r.get('server_us_per_delivery') for r in b], '.2f')} | "
              f"{spread([r.get('generator_cpu_s') for r in b], '.1f')} | {'yes' if ok else 'NO'} |")
    enc = [(kind, res) for kind, res in rows if res["be"]]
    if enc:
        print("\n(be) = (b) in an end-to-end encrypted private room: every message a Megolm "
              "envelope of 200 bytes of text, encrypted by its sender as it is sent; beside "
              "the plaintext (b) of the same runs.\n")
        print("| server | (b) deliveries/s | (be) deliveries/s | (b) server µs/delivery | "
              "(be) server µs/delivery | (be) generator CPU s | all ok |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind, res in enc:
            b, be = res["b"], res["be"]
            print(f"| {kind} | {spread([r.get('deliveries_per_s') for r in b], ',.0f')} | "
                  f"{spread([r.get('deliveries_per_s') for r in be], ',.0f')} | "
                  f"{spread([r.get('server_us_per_delivery') for r in b], '.2f')} | "
                  f"{spread([r.get('server_us_per_delivery') for r in be], '.2f')} | "
                  f"{spread([r.get('generator_cpu_s') for r in be], '.1f')} | "
                  f"{'yes' if all(r.get('ok') for r in be) else 'NO'} |")
    if dec := extra.get("decrypt"):
        print(f"\nA client's decryption of room messages (chat-client's machinery: frame "
              f"checks, Megolm, the replay table in its key store; one core): "
              f"{dec.get('per_s', 0):,.0f} messages/s, {dec.get('us_each', 0):.1f} µs of CPU "
              f"each (bare vodozemac: {dec.get('vodozemac_us_each', 0):.1f} µs)"
              f"{'' if dec.get('ok') else ' FAILED ' + str(dec.get('errors'))}")
    if c := extra.get("c"):
        print(f"\n(c) chat: {c.get('held')}/{c.get('idle_connections')} idle connections held "
              f"(users registered at bcrypt cost 4), {c.get('rss_per_connection_kib', 0):.1f} "
              f"KiB RSS each, idle CPU {c.get('idle_cpu_percent', 0):.2f}% over "
              f"{c.get('idle_seconds', 0):g} s ({c.get('idle_pongs', 0)} pings answered, "
              f"{c.get('server_us_per_ping') or 0:.0f} µs of server CPU each), 10 active clients "
              f"{'ok' if c.get('active_ok') else 'FAILED'}; setup {c.get('setup_s', 0):.0f} s"
              f"{'' if c.get('ok') else ' ' + str(c.get('errors'))}")
    if d := extra.get("d"):
        print(f"\n(d) chat, bcrypt cost 12, {d[0].get('attempts', '?')} login attempts in "
              f"{args.seconds:g} s during (a): logins/s "
              f"{spread([r.get('logins_per_s') for r in d], '.2f')} against a limit of "
              f"{spread([r.get('bcrypt_limit_per_s') for r in d], '.2f')} "
              f"({spread([r.get('share_of_limit', 0) * 100 for r in d], '.0f')}%); chat p50 "
              f"{spread([r.get('chat_p50_ms') for r in d], '.1f')} ms, p99 "
              f"{spread([r.get('chat_p99_ms') for r in d], '.1f')} ms; CPU-s in the "
              f"{args.seconds:g} s on {os.cpu_count()} cores: server "
              f"{spread([r.get('chat_server_cpu_s') for r in d], '.1f')}, chat generator "
              f"{spread([r.get('chat_generator_cpu_s') for r in d], '.1f')}, storm "
              f"{spread([r.get('storm_cpu_s') for r in d], '.1f')}; outcomes "
              f"{[r.get('outcomes') for r in d]}; all ok: "
              f"{'yes' if all(r.get('ok') for r in d) else 'NO ' + str(d)}")
    if e := extra.get("e"):
        k, v = e["killed"], e["verify"]
        us = spread([r.get("server_us_per_message") for r in e["runs"]], ".1f")
        print(f"\n(e) chat: {spread([r.get('stored_per_s') for r in e['runs']], ',.0f')} "
              f"messages stored/s ({us}"
              f" µs of server CPU each); kill -9 after {k.get('killed_at_s') or 0:.1f} s: "
              f"{v.get('acknowledged')} acknowledged, {v.get('missing')} missing from history, "
              f"{v.get('stored_unacknowledged')} stored but not acknowledged; "
              f"{'ok' if v.get('ok') and k.get('ok') else 'FAILED ' + str(k) + str(v)}")


if __name__ == "__main__":
    raise SystemExit(main())
