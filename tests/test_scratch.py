"""Per-thread work buffers: reused within a thread, never shared across threads, never kept whole-tensor sized."""

from __future__ import annotations

import threading

import torch

from loratools import scratch as base
from loratools.scratch import buffer as scratch


def test_scratch_is_reused_per_thread_and_never_kept_whole_tensor_sized():
    a = scratch("test-a", 1000)
    assert a.numel() == 1000 and a.dtype == torch.float32
    again = scratch("test-a", 600)
    assert again.numel() == 600 and again.data_ptr() == a.data_ptr()  # the same memory, no fresh allocation
    ints = scratch("test-i", 10, torch.int32)
    assert ints.dtype == torch.int32 and ints.data_ptr() != a.data_ptr()
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(scratch("test-a", 1000).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != a.data_ptr()  # each pool worker has its own
    big = scratch("test-big", base.KEEP + 1)
    assert big.numel() == base.KEEP + 1 and scratch("test-big", 10).data_ptr() != big.data_ptr()
