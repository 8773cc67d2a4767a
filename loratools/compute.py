"""Where and how dense work runs: the ``--device`` choice and the torch thread policy, one home each.

Device: ``auto`` uses CUDA when present, else the CPU (merge, extract).  Threads: torch's intra-op
threads spin-wait between the many small ops of a streamed merge or a per-module factorisation; on
a busy 2-core machine that made them up to 40x slower (7B-adapter resize 20 s instead of 4 s).
Independent work items on a pool of single-threaded workers do not wait for each other, so both
merge (row blocks) and arithmetic (modules) run that way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from . import spec
from .errors import ArgumentError

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without CUDA is a clear error."""
    if device not in spec.DEVICES:
        raise ArgumentError(f"device {device!r} is not one of {', '.join(spec.DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT = 128 * 1024  # both parameters' glibc defaults
_KEEP = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reused_memory() -> Iterator[None]:
    """Freed blocks of up to 32 MiB stay in the process for the next allocation (glibc; elsewhere a no-op).

    A streamed merge method allocates a few MiB of temporaries per row block on each worker
    thread; glibc returns such blocks to the OS (mmap / heap trim) and the next allocation faults
    every page back in: measured 5x slower per block on a 2-core VM (a TIES tensor's row blocks
    0.9 s instead of 0.18 s).  On exit the defaults come back and the kept memory is released.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)
    libc.mallopt(_M_TRIM_THRESHOLD, 8 * _KEEP)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
        libc.malloc_trim(0)


@contextmanager
def single_threaded(*, pause_gc: bool = False) -> Iterator[ThreadPoolExecutor]:
    """torch ops single-threaded, with a pool of one worker per former torch thread for independent items.

    ``pause_gc`` also pauses Python's cyclic GC: a streamed merge makes no cycles, yet the
    allocations of thousands of row blocks set off collections that walk every object torch's import
    made (measured: 11% of a 1.8 GiB merge's CPU time).  Both settings are restored on exit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    collecting = pause_gc and gc.isenabled()
    if collecting:
        gc.disable()
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, cpu_count()))) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


def per_item(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on single-threaded workers (:func:`single_threaded`); in order.

    A module's QRs are (m x r) with r ~ 64: too small to split across threads, so items run in
    parallel instead; torch ops release the GIL.  With fewer items than CPUs (``add --method`` of a
    few large modules, whose dense SVDs do split well) each worker's torch ops get an equal share
    of the CPUs instead of one (torch's thread count is per thread; the caller's comes back on exit).
    """
    threads = torch.get_num_threads()
    if threads == 1 or len(items) < 2:
        return [fn(x) for x in items]
    share = max(1, min(threads, cpu_count()) // len(items))
    if share == 1:
        with single_threaded() as pool:
            return list(pool.map(fn, items))

    def shared(x: T) -> R:
        torch.set_num_threads(share)
        return fn(x)

    with single_threaded() as pool:
        return list(pool.map(shared, items))
