"""The bounded worker pool: refuses at once when full, and can run its workers niced."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from chat.errors import ServerBusy
from chat.pool import BoundedPool


def test_a_full_pool_says_busy_at_once() -> None:
    pool = BoundedPool(1, 1, name="t")
    pool.start()
    release, started = threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(20)))
        assert started.wait(20)
        pool.submit(lambda: None)  # the one queue slot
        with pytest.raises(ServerBusy):
            pool.submit(lambda: None)
    finally:
        release.set()
        pool.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_workers_run_at_the_lower_priority_and_the_rest_do_not() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []
    done = threading.Event()
    pool = BoundedPool(1, 4, name="t", nice=5)
    pool.start()
    try:
        pool.submit(lambda: (seen.append(
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), done.set()))
        assert done.wait(20)
    finally:
        pool.stop()
    assert seen == [min(19, base + 5)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
