"""Many clients at once: nothing lost, duplicated, reordered per sender or corrupted."""

from __future__ import annotations

import threading

from conftest import PASSWORD, TIMEOUT

CLIENTS = 50
PER_CLIENT = 20


def test_fifty_clients_send_and_receive(server_factory):
    server = server_factory(max_outbound_bytes=8 * 1024 * 1024)
    names = [f"user{i:02d}" for i in range(CLIENTS)]
    for name in names:
        server.register(name)
    clients = []
    for name in names:
        c = server.client()
        assert c.login(name, PASSWORD)["type"] == "welcome"
        clients.append(c)
    # Everyone is online before anyone speaks (each sees the presence of those after it).
    ready = clients[0].request({"type": "who", "room": "general"})
    assert len(ready["users"]) == CLIENTS

    expected = CLIENTS * PER_CLIENT
    received: dict[str, list[dict]] = {n: [] for n in names}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def run(name: str, c) -> None:
        try:
            start.wait(TIMEOUT)
            for i in range(PER_CLIENT):
                c.send({"type": "send", "room": "general", "message": f"{name}|{i}|ü✓",
                        "id": f"{name}-{i}"})
            got = received[name]
            while len(got) < expected:
                frame = c.recv()
                if frame["type"] == "message":
                    got.append(frame)
                elif frame["type"] == "error":
                    raise AssertionError(frame)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in zip(names, clients,
                                                                          strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)

    reference = [(f["msg_id"], f["username"], f["message"]) for f in received[names[0]]]
    for name in names:
        frames = received[name]
        ids = [f["msg_id"] for f in frames]
        assert len(ids) == expected and len(set(ids)) == expected  # nothing lost or doubled
        # Every session sees the same global order, so per-sender order holds too.
        assert [(f["msg_id"], f["username"], f["message"]) for f in frames] == reference
        own = [f for f in frames if f["username"] == name]
        assert [f["message"] for f in own] == [f"{name}|{i}|ü✓" for i in range(PER_CLIENT)]
        assert [f.get("re") for f in own] == [f"{name}-{i}" for i in range(PER_CLIENT)]
        assert all("re" not in f for f in frames if f["username"] != name)
    for c in clients:
        c.close()
