"""Pipeline stages stop together: the first error stops every other stage, and the owner re-raises it."""

from __future__ import annotations

import queue
import threading

import pytest

from loratools.io.pipeline import Stopped, Worker, get, put


def test_put_and_get_pass_items_until_stopped():
    stop = threading.Event()
    q: queue.Queue = queue.Queue(maxsize=1)
    put(q, 7, stop)
    assert get(q, stop) == 7
    stop.set()
    with pytest.raises(Stopped):
        get(q, stop)
    with pytest.raises(Stopped):
        put(q, 1, stop)


def test_a_failing_stage_stops_a_stage_waiting_on_it():
    stop = threading.Event()
    q: queue.Queue = queue.Queue(maxsize=1)
    seen: list[int] = []

    def consumer() -> None:
        while True:
            seen.append(get(q, stop))

    def producer() -> None:
        put(q, 1, stop)
        raise OSError(28, "No space left on device")

    workers = [Worker(consumer, stop), Worker(producer, stop)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
    assert stop.is_set() and workers[0].error is None and isinstance(workers[1].error, OSError)
    assert seen in ([1], [])  # the item may or may not have been taken before the stop
