"""Per-thread work buffers for CPU row-block arithmetic, reused from block to block.

Row blocks are a few MiB. Fresh allocations of that size are mmapped and given back to the
system on every free, and faulting their pages in again cost more than the arithmetic done on
them: 5x in a merge method's selection, 2x in an FP8 row block's requantization (measured on a
2-core VM). Each thread, and so each pool worker, keeps its own buffers under a name. A request
above :data:`KEEP` elements (a whole tensor, as DoRA's column norms need) gets a fresh tensor
that is not kept, so a thread never holds more than a few row blocks.
"""

from __future__ import annotations

import threading

import torch

KEEP = 1 << 22  # elements: the largest buffer a thread keeps (16 MiB of float32; row blocks are about 2 MiB)
_local = threading.local()


def buffer(name: str, numel: int, dtype: torch.dtype = torch.float32, *, least: int = 1 << 19) -> torch.Tensor:
    """This thread's flat buffer ``name`` of ``dtype`` with ``numel`` elements (at least ``least`` allocated)."""
    if numel > KEEP:
        return torch.empty(numel, dtype=dtype)
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(max(numel, least), dtype=dtype)
    return buf[:numel]
