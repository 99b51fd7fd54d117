"""The beginner's baseline: a thread per client, one global lock, blocking sendall to each
recipient in turn. It speaks just enough of protocol v1 for the load generator (hello,
register, login without bcrypt, join, send to a room) over TLS. Not for use: it is here
to be measured against.

    python bench/naive_server.py --port 0 --certfile C --keyfile K
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat import tls

lock = threading.Lock()
rooms: dict[str, list[ssl.SSLSocket]] = {}
next_id = 0


def ts() -> str:
    ms = time.time_ns() // 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def serve(conn: ssl.SSLSocket) -> None:
    global next_id
    name = "?"
    joined: list[str] = []
    f = conn.makefile("rb")
    try:
        conn.sendall(b'{"type":"hello","protocol":1,"server":"naive/0","max_frame_bytes":16384,'
                     b'"min_password_length":15}\n')
        for line in f:
            req = json.loads(line)
            kind, rid = req.get("type"), req.get("id")
            if kind == "register":
                reply = {"type": "ok", "op": "register", "username": req["username"]}
            elif kind == "login":
                name = req["username"]
                reply = {"type": "welcome", "username": name, "rooms": [], "session": "x"}
            elif kind == "join":
                with lock:
                    rooms.setdefault(req["room"], []).append(conn)
                joined.append(req["room"])
                reply = {"type": "ok", "op": "join", "room": req["room"]}
            elif kind == "send":
                with lock:  # the beginner's way: everyone waits for the slowest socket
                    next_id += 1
                    frame = {"type": "message", "msg_id": next_id, "ts": ts(), "username": name,
                             "room": req["room"], "message": req["message"]}
                    for member in rooms.get(req["room"], []):
                        out = dict(frame, re=rid) if member is conn and rid is not None else frame
                        member.sendall(json.dumps(out, separators=(",", ":")).encode() + b"\n")
                continue
            elif kind == "quit":
                conn.sendall(b'{"type":"bye","reason":"quit"}\n')
                return
            else:
                reply = {"type": "pong"} if kind == "ping" else {"type": "error", "code": "x"}
            if rid is not None:
                reply["re"] = rid
            with lock:
                conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
    except (OSError, ValueError, KeyError):
        pass
    finally:
        with lock:
            for room in joined:
                if conn in rooms.get(room, []):
                    rooms[room].remove(conn)
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--certfile", required=True)
    ap.add_argument("--keyfile", required=True)
    args = ap.parse_args()
    ctx = tls.server_context(args.certfile, args.keyfile)
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
    threading.stack_size(256 * 1024)
    while True:
        raw, _ = listener.accept()
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
