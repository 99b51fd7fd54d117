"""Run miniircd (from its own venv) with two minimal patches, so that it can hold 10,000
TLS clients at all. Everything else is miniircd as published; start.py uses this by
default (`--stock-miniircd` runs it unpatched).

1. select.select -> poll. miniircd's main loop calls select.select() over every client
   socket, and select() cannot take a file descriptor >= FD_SETSIZE (1024): Python raises
   ValueError and the whole server dies at about the 1,000th client. The replacement has
   select()'s exact signature and results but uses poll(2), which has no such limit. It is
   O(clients) per loop iteration, like select() itself, so the cost model is unchanged.
2. TLS read-ahead. miniircd reads with recv(1024). When a TLS record carries more than 1024
   bytes of plaintext, the rest waits inside the SSL object, where select()/poll() cannot
   see it, and that client stalls until it sends something else. The replacement also
   reports as readable every socket whose SSL object has pending plaintext (pending() > 0),
   so buffered lines are processed on the next loop iteration.

Not changed (documented in README.md): blocking sockets, the TLS handshake done inside
accept() on the main loop, listen(5), one O(members) fan-out per channel message.

    python bench/peers/miniircd_shim.py [miniircd options...]
"""

from __future__ import annotations

import select as _select_mod
import sys

import miniircd

_POLLIN = _select_mod.POLLIN | _select_mod.POLLPRI
_POLLOUT = _select_mod.POLLOUT
_READ_READY = _POLLIN | _select_mod.POLLHUP | _select_mod.POLLERR | _select_mod.POLLNVAL
_WRITE_READY = _POLLOUT | _select_mod.POLLHUP | _select_mod.POLLERR | _select_mod.POLLNVAL


def poll_select(rlist, wlist, xlist, timeout=None):
    """select.select() semantics on top of poll(): no FD_SETSIZE ceiling."""
    rmap = {}
    wmap = {}
    pending = []
    for obj in rlist:
        rmap[obj.fileno()] = obj
        has_pending = getattr(obj, "pending", None)
        if has_pending is not None and has_pending():
            pending.append(obj)
    for obj in wlist:
        wmap[obj.fileno()] = obj
    poller = _select_mod.poll()
    for fd in rmap:
        poller.register(fd, _POLLIN | (_POLLOUT if fd in wmap else 0))
    for fd in wmap:
        if fd not in rmap:
            poller.register(fd, _POLLOUT)
    if pending:
        timeout = 0  # buffered plaintext is ready now; do not sleep
    ms = None if timeout is None else max(0, int(timeout * 1000))
    ready_r = list(pending)
    seen = {id(o) for o in pending}
    ready_w = []
    for fd, events in poller.poll(ms):
        if events & _READ_READY and fd in rmap and id(rmap[fd]) not in seen:
            ready_r.append(rmap[fd])
        if events & _WRITE_READY and fd in wmap:
            ready_w.append(wmap[fd])
    return ready_r, ready_w, []


miniircd.select.select = poll_select  # miniircd calls select.select(...) via its module

if __name__ == "__main__":
    sys.argv[0] = "miniircd"
    miniircd.main()
