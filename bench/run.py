"""Start each server, run the workloads against it, stop it, print one table.

    bench/run.sh [--runs 3] [--seconds 10] [--idle 2000] [--servers chat,naive]

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
    "--max-connections-per-ip", "100000", "--registrations-per-ip", "1000000",
    "--login-ip-failures", "1000000", "--log-level", "WARNING",
]


def start(kind: str, certs: Path, data: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    if kind == "chat":
        cmd = [PY, "-m", "chat.server", "--port", "0", "--data-dir", str(data),
               "--certfile", str(certs / "server.crt"), "--keyfile", str(certs / "server.key"),
               *BENCH_LIMITS, *extra]
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # chat-server prints its ready line whatever the log level: wait for it.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
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
        cmd += [f"--{k}", str(v)]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--servers", default="chat,naive,ngircd,inspircd,miniircd",
                    help="comma-separated; the IRC peers need bench/peers/install.sh first")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run([PY, "-m", "chat.certs", "--out", str(certs)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for kind in args.servers.split(","):
            results: dict[str, list[dict]] = {"a": [], "b": []}
            for run in range(args.runs):
                for w in ("a", "b"):
                    proc, port = start(kind, certs, Path(tmp) / f"{kind}-{w}-{run}", [])
                    pid = getattr(proc, "server_pid", proc.pid)
                    proto = "irc" if kind in PEERS else "chat"
                    try:
                        results[w].append(loadgen(w, port, pid, certs / "ca.crt",
                                                  f"{w}{run}x", proto, seconds=args.seconds))
                    finally:
                        stop(proc)
                    print(f"{kind} {w} run {run}: {results[w][-1]}", file=sys.stderr)
            c = None
            if kind == "chat" and args.idle:
                proc, port = start(kind, certs, Path(tmp) / f"{kind}-c", ["--bcrypt-rounds", "4"])
                try:
                    c = loadgen("c", port, proc.pid, certs / "ca.crt", "c", "chat",
                                idle=args.idle, seconds=args.seconds)
                finally:
                    stop(proc)
                print(f"{kind} c: {c}", file=sys.stderr)
            rows.append((kind, results, c))
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"median (min..max) of {args.runs} runs of {args.seconds:g} s\n")
    print("| server | (a) p50 ms | (a) p99 ms | (a) max ms | (a) generator CPU s | "
          "(b) deliveries/s | (b) server µs/delivery | (b) generator CPU s | all ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, res, _c in rows:
        a, b = res["a"], res["b"]
        ok = all(r.get("ok") for r in a + b)
        print(f"| {kind} | {spread([r.get('p50_ms') for r in a], '.2f')} | "
              f"{spread([r.get('p99_ms') for r in a], '.2f')} | "
              f"{spread([r.get('max_ms') for r in a], '.1f')} | "
              f"{spread([r.get('generator_cpu_s') for r in a], '.1f')} | "
              f"{spread([r.get('deliveries_per_s') for r in b], ',.0f')} | "
              f"{spread([r.get('server_us_per_delivery') for r in b], '.2f')} | "
              f"{spread([r.get('generator_cpu_s') for r in b], '.1f')} | {'yes' if ok else 'NO'} |")
    for kind, _res, c in rows:
        if c:
            print(f"\n(c) {kind}: {c['held']}/{c['idle_connections']} idle connections held "
                  f"(users registered at bcrypt cost 4), {c['rss_per_connection_kib']:.1f} KiB "
                  f"RSS each, idle CPU {c['idle_cpu_percent']:.1f}%, 10 active clients "
                  f"{'ok' if c['active_ok'] else 'FAILED'}; setup {c['setup_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
