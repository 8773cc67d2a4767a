"""Threads joined into a pipeline by bounded queues, all stopping together when one stage fails.

Every blocking queue operation polls a shared ``stop`` event, so no stage can wait forever on a
stage that died: the first error sets ``stop``, the others raise :class:`Stopped` and unwind, and
the owner re-raises the stored error on its own thread once it has joined them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

TICK = 0.1  # seconds between checks of ``stop`` while waiting on a queue


class Stopped(Exception):
    """Raised inside a pipeline stage when another stage failed or was interrupted."""


def put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=TICK)
            return
        except queue.Full:
            continue
    raise Stopped


def get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=TICK)
        except queue.Empty:
            continue
    raise Stopped


class Worker(threading.Thread):
    """A pipeline stage; its first error stops the others and is kept for the owner to re-raise."""

    def __init__(self, fn: Callable[..., None], stop: threading.Event, *args: Any):
        super().__init__(daemon=True)
        self._fn, self._stop_event, self._args = fn, stop, args
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn(*self._args)
        except Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the owner's thread
            self.error = err
            self._stop_event.set()
