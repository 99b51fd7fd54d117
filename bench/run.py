"""Start each server, run the workloads against it, stop it, print one table.

    bench/run.sh [--runs 3] [--seconds 10] [--idle 10000] [--servers chat,naive]
                 [--workloads a,b,be,c,d,e,f] [--setups sqlite,pg,pg-redis,cluster]

Our server runs with its flood limits raised (the documented benchmark settings: frame
rate, connections and registrations per address, failed logins per address, the reply
budget for (e)'s reading of history), since the peers run with theirs off; everything
else is default, bcrypt cost 12 included, except workloads (c) and (f), which register
their users at cost 4 (stated in the table).

Workload (f) runs against our server set up several ways (`--setups`): one node on SQLite,
one on PostgreSQL, one on PostgreSQL and Redis (a cluster of one), and three nodes on
PostgreSQL and Redis (bench/nodes.py makes a database and a Redis of the run's own).
With `e` and the setup `cluster`, (e)'s kill -9 check runs on the three nodes too.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
sys.path.insert(0, str(REPO))

from bench import nodes  # noqa: E402

PEERS = ("ngircd", "inspircd", "miniircd")
BENCH_LIMITS = [
    "--frames-per-second", "1000000", "--frame-burst", "1000000",
    "--read-bytes-per-second", "1000000000",
    "--max-connections-per-ip", "100000", "--registrations-per-ip", "1000000",
    "--login-ip-failures", "1000000", "--log-level", "WARNING",
    # (e)'s check reads every stored message back through history, which the reply
    # budget (issue 16) would pace to ~250 rows a second: 10 minutes for a 10 s run.
    "--reply-bytes-per-second", "1000000000",
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
            # Keep draining stderr so the server never blocks on a full pipe, into a file
            # a setup of several nodes shows at its end (warnings and errors only).
            keeper = threading.Thread(target=_keep, args=(proc.stderr, data / "server.log"),
                                      daemon=True)
            keeper.start()
            proc.keeper = keeper  # type: ignore[attr-defined]
            return proc, int(m.group(1))
    raise SystemExit(f"{kind} did not start")


def _keep(stream, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for line in stream:
            out.write(line)
            out.flush()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if keeper := getattr(proc, "keeper", None):
        keeper.join(5)  # the last lines written, for show_logs


# (f)'s setups of our server: (nodes, on PostgreSQL, with Redis). "pg-redis" is one node
# of a cluster: the cluster's write path (chat.cluster) without the other nodes.
SETUPS = {"sqlite": (1, False, False), "pg": (1, True, False), "pg-redis": (1, True, True),
          "cluster": (3, True, True)}
SETUP_NAMES = {"sqlite": "1 node, SQLite", "pg": "1 node, PostgreSQL",
               "pg-redis": "1 node, PostgreSQL + Redis", "cluster": "3 nodes, PostgreSQL + Redis"}


@contextlib.contextmanager
def setup(name: str, certs: Path, data: Path, extra: list[str]) -> Iterator[dict]:
    """Our server as (f)'s setup `name`, started and, at the end, stopped: its nodes'
    processes and ports, the database and the Redis, and `restart(i)` for node i."""
    count, pg, redis = SETUPS[name]
    with contextlib.ExitStack() as stack:
        stack.callback(show_logs, name, [data / f"node{i}" / "server.log" for i in range(count)])
        flags = list(extra)
        got: dict = {"db": None, "redis": None}
        if pg:
            got["db"], url = nodes.create_database()
            stack.callback(nodes.drop_database, got["db"])
            flags += ["--db", url]
        if redis:
            got["redis"] = nodes.Redis(data / "redis")
            stack.callback(got["redis"].stop)
            # Nodes share the pepper (and the certificate); each has its own data dir.
            flags += ["--redis", got["redis"].url, "--redis-prefix", "bench",
                      "--pepper-file", str(data / "pepper")]

        got["procs"], got["ports"] = [None] * count, [None] * count

        def restart(i: int) -> None:
            got["procs"][i], got["ports"][i] = start("chat", certs, data / f"node{i}", flags)
            stack.callback(stop, got["procs"][i])

        for i in range(count):
            restart(i)
        got["restart"] = restart
        yield got


def show_logs(name: str, paths: list[Path]) -> None:
    """What the nodes logged (at WARNING and above), on stderr: a healthy run logs nothing."""
    for i, path in enumerate(paths):
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            print(f"{name} node {i} logged {len(lines)} lines; the first:", file=sys.stderr)
            for line in lines[:20]:
                print(f"    {line}", file=sys.stderr)


def loadgen(workload: str, port: int | list[int], pid: int | list[int], cafile: Path,
            prefix: str, proto: str, **opts) -> dict:
    """bench/loadgen.py's result; several ports and pids for the nodes of a cluster."""
    def listed(x: int | list[int]) -> str:
        return ",".join(map(str, x)) if isinstance(x, list) else str(x)

    cmd = [PY, str(BENCH / "loadgen.py"), workload, "--port", listed(port), "--pid", listed(pid),
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


def run_f(certs: Path, tmp: Path, setups: list[str], runs: int, seconds: float) -> dict:
    """(f) against each setup, runs outermost as for (a) and (b)."""
    results: dict[str, list] = {name: [] for name in setups}
    for run in range(runs):
        for name in setups:
            with setup(name, certs, tmp / f"f-{name}-{run}", ["--bcrypt-rounds", "4"]) as s:
                side = {"pg_db": s["db"]} if s["db"] else {}
                if s["redis"]:
                    side["redis_pid"] = s["redis"].proc.pid
                results[name].append(loadgen(
                    "f", s["ports"], [p.pid for p in s["procs"]], certs / "ca.crt",
                    f"f{run}x", "chat", seconds=seconds, **side))
            print(f"{name} f run {run}: {results[name][-1]}", file=sys.stderr)
    return results


def run_e_cluster(certs: Path, tmp: Path, seconds: float) -> dict:
    """(e)'s kill -9 on three nodes: the first killed half way, its clients logging in
    again on the others; then it is restarted and every acknowledged msg_id, and every
    reader's stream, compared with history there."""
    seen = tmp / "seen-cluster.json"
    with setup("cluster", certs, tmp / "e-cluster", []) as s:
        killed = loadgen("e", s["ports"], [p.pid for p in s["procs"]], certs / "ca.crt",
                         "ec", "chat", seconds=seconds,
                         **{"kill-after": seconds / 2, "seen-file": seen})
        s["procs"][0].wait(30)
        s["restart"](0)
        check = loadgen("verify", s["ports"][0], s["procs"][0].pid, certs / "ca.crt", "ec",
                        "chat", **{"seen-file": seen})
    print(f"cluster e kill: {killed} / verify: {check}", file=sys.stderr)
    return {"killed": killed, "verify": check}


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
                    help="(c), (d), (e) and (f) run against our server only")
    ap.add_argument("--setups", default="sqlite,pg,pg-redis,cluster",
                    help="(f): our server on SQLite, on PostgreSQL, one and three nodes on "
                    "PostgreSQL and Redis; comma-separated")
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
        if "f" in workloads:
            setups = args.setups.split(",")
            extra["f"] = run_f(certs, tmp, setups, args.runs, args.seconds)
            if "e" in workloads and "cluster" in setups:
                extra["e_cluster"] = run_e_cluster(certs, tmp, args.seconds)
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
    if rows and any(res["a"] or res["b"] for _, res in rows):
        print_ab(rows)
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
              f"{v.get('doubled')} doubled, {v.get('stored_unacknowledged')} stored but not "
              f"acknowledged; "
              f"{'ok' if v.get('ok') and k.get('ok') else 'FAILED ' + str(k) + str(v)}")
    if f := extra.get("f"):
        print_f(args, f)
    if ec := extra.get("e_cluster"):
        k, v = ec["killed"], ec["verify"]
        print(f"\n(e) on 3 nodes (PostgreSQL, Redis), bcrypt cost 12, a reader on each node in "
              f"all 50 rooms: {k.get('stored_per_s') or 0:,.0f} messages stored/s before the "
              f"kill ({k.get('server_us_per_message') or 0:.1f} µs of the nodes' CPU each); "
              f"node 1 killed with kill -9 after {k.get('killed_at_s') or 0:.1f} s, its clients "
              f"logged in on nodes 2 and 3 within {k.get('back_after_s') or 0:.1f} s; "
              f"{v.get('acknowledged')} acknowledged, {v.get('missing')} missing from history "
              f"(read on node 1 restarted), {v.get('doubled')} doubled, "
              f"{v.get('stored_unacknowledged')} stored but not acknowledged; readers: "
              f"{v.get('reader_deliveries')} deliveries checked, {v.get('reader_missing')} "
              f"missing, {v.get('reader_doubled')} doubled or out of order; "
              f"{'ok' if v.get('ok') and k.get('ok') else 'FAILED ' + str(k) + str(v)}")


def print_ab(rows: list) -> None:
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


def print_f(args, results: dict) -> None:
    print("\n(f): 48 clients in one room, client i on node i mod n, 12 senders (4 a node on "
          "3 nodes); users at bcrypt cost 4. Deliveries/s with 10 messages unacknowledged a "
          "sender; CPU per delivery: the nodes' processes, and apart PostgreSQL's backends "
          "for the run's database and the Redis server.\n")
    print("| setup | deliveries/s | nodes µs/delivery | PostgreSQL + Redis µs/delivery | "
          "generator CPU s | all ok |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rs in results.items():
        def col(key: str, fmt: str, rs: list = rs) -> str:
            return spread([r.get(key) for r in rs], fmt)

        ok = bool(rs) and all(r.get("ok") for r in rs)
        print(f"| {SETUP_NAMES.get(name, name)} | {col('deliveries_per_s', ',.0f')} | "
              f"{col('server_us_per_delivery', '.2f')} | "
              f"{col('side_us_per_delivery', '.2f') if name != 'sqlite' else '-'} | "
              f"{col('generator_cpu_s', '.1f')} | "
              f"{'yes' if ok else 'NO ' + str([r.get('errors') for r in rs])} |")
    print("\n(f) latency from send to receipt at a fixed rate, before the deliveries/s: "
          "on the sender's node (its own echo left out) and on the other nodes.\n")
    print("| setup | messages/s | p50 ms same node | p99 ms same node | p50 ms other nodes | "
          "p99 ms other nodes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rs in results.items():
        rates = rs[0].get("latency", {}) if rs else {}
        for rate in rates:
            def lat(key: str, rs: list = rs, rate: str = rate) -> str:
                return spread([r.get("latency", {}).get(rate, {}).get(key) for r in rs], ".2f")

            print(f"| {SETUP_NAMES.get(name, name)} | {rate} | {lat('same_p50_ms')} | "
                  f"{lat('same_p99_ms')} | {lat('other_p50_ms')} | {lat('other_p99_ms')} |")

if __name__ == "__main__":
    raise SystemExit(main())
