"""Random membership changes and messages in an encrypted room, with real vodozemac.

The rule under test: every device of every member at the time of a message can decrypt
it; no device of anyone who is not a member then can (not even one that was a member
before, and kept its old keys). The client's policy is the one chat-client follows:
before sending, a member shares its current session with every device of every member
(its own other devices included); when anyone leaves, is kicked or banned, every
member's session for the room is rotated.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_client_crypto import Net

from chat.client.e2e_results import Status

ROOM = "dev"
USERS = ("alice", "bob", "carol", "dave")
DEVICES = {"alice": ("laptop", "phone"), "bob": ("phone",), "carol": ("desk",),
           "dave": ("laptop", "tablet")}

steps = st.lists(st.tuples(st.sampled_from(("join", "leave", "send", "send")),
                           st.sampled_from(USERS)), min_size=1, max_size=14)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=steps)
def test_members_at_send_time_read_a_message_and_nobody_else_does(steps):
    with tempfile.TemporaryDirectory() as tmp:
        net = Net(Path(tmp))
        machines = {(u, d): net.device(u, d) for u in USERS for d in DEVICES[u]}
        for m in machines.values():
            net.query(m, *USERS)
        members = {"alice"}
        for n, (op, user) in enumerate(steps):
            if op == "join":
                members.add(user)
            elif op == "leave" and user in members:
                members.discard(user)
                for (u, _d), m in machines.items():
                    if u in members:
                        m.rotate(ROOM)
            elif op == "send" and user in members:
                sender = machines[(user, DEVICES[user][0])]
                targets = [(u, d) for u in sorted(members) for d in DEVICES[u]
                           if (u, d) != (sender.user, sender.device)]
                results = net.share(sender, ROOM, targets)
                assert all(r.status is Status.OK for r in results), results
                frame = net.send(sender, ROOM, f"message {n}", room=ROOM)
                for (u, d), m in machines.items():
                    got = m.decrypt(frame)
                    if u in members:
                        assert (got.status, got.text) == (Status.OK, f"message {n}"), (u, d)
                    else:
                        assert got.status is not Status.OK and got.text is None, (u, d)
        for m in machines.values():
            m.store.close()
