"""Output files written front to back, around the page cache (``O_DIRECT``) where the file system allows.

Why direct: a merged checkpoint is written once and never read back by us.  Buffered writes copy
every byte into page cache the kernel must allocate, write back and evict: a 70B merge pushes 140 GB
through a 24 GiB machine's cache, evicting the user's working set, and on VMs that hand freed memory
back to their host every fresh cache page faults at the host as well (measured on our 2-core CI VM,
1.5 GiB written once memory has settled: buffered 0.36-0.56 GiB/s, direct 1.6-2.9 GiB/s).

Direct I/O wants block-aligned file offsets and lengths and memory aligned like the offset.
safetensors' layout is not block-aligned, so the bytes of a write that precede the next block
boundary complete the previous write's unfinished block (kept in a one-block carry buffer), whole
blocks go straight from the caller's memory to the disk, and the remainder becomes the new carry.
Callers that place their data at an address congruent to its file offset (modulo :data:`ALIGN`)
are written without any copy; other data is bounced through a staging buffer.  The last block is
padded and the file truncated to its true length.  Where the file system refuses ``O_DIRECT`` (at
open or at a write: some FUSE and network file systems; macOS has no such flag) the same bytes go
through the page cache instead.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import torch

from .tensorfile import tensor_bytes

ALIGN = 4096  # covers 512- and 4096-byte logical blocks and the memory alignment they need
_STAGE = 8 * 2**20  # bounce buffer for data not aligned like its file offset; a multiple of ALIGN
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP}  # O_DIRECT refused at open or write
_NO_DIRECT_MEMORY = {errno.EFAULT}  # memory the kernel cannot pin for DMA (some accelerators' host memory)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class Sink:
    """Append-only writer of one new file.  :meth:`write` bytes in order, then :meth:`close`.

    On failure call :meth:`abort` (or :meth:`close` raises and aborts); the caller removes the file.
    """

    def __init__(self, path: Path, *, direct: bool = True, fsync: bool = False):
        self.path, self._fsync = path, fsync
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = bool(direct and _O_DIRECT)
        try:
            self._fd = os.open(path, flags | (_O_DIRECT if self.direct else 0), 0o666)
        except OSError as err:
            if not self.direct or err.errno not in _NO_DIRECT:
                raise
            self.direct = False
            self._fd = os.open(path, flags, 0o666)
        self.size = 0  # bytes appended so far
        self._carry = mmap.mmap(-1, ALIGN)  # anonymous maps are page-aligned
        self._fill = 0  # bytes of the unfinished last block held in the carry
        self._stage: mmap.mmap | None = None

    def write(self, tensor: torch.Tensor) -> None:
        """Append the bytes of contiguous CPU ``tensor``; zero-copy when its address ≡ :attr:`size` mod :data:`ALIGN`."""
        data = tensor_bytes(tensor)
        if not self.direct:
            self._write_buffered(data)
            return
        address = tensor.data_ptr()
        head = min(len(data), (ALIGN - self._fill) % ALIGN)  # completes the carried block
        if head:
            self._append_carry(data[:head])
        body = (len(data) - head) // ALIGN * ALIGN
        if body:
            if (address + head) % ALIGN == 0:
                self._pwrite(data[head : head + body], self.size)
            else:
                self._bounce(data[head : head + body])
            self.size += body
        if head + body < len(data):
            self._append_carry(data[head + body :])

    def close(self) -> None:
        """Write the carried block (padded), truncate to the true length, flush if asked, close."""
        try:
            if self.direct:
                if self._fill:
                    self._carry[self._fill :] = bytes(ALIGN - self._fill)
                    self._pwrite(memoryview(self._carry), self.size - self._fill)
                os.ftruncate(self._fd, self.size)
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        self.abort()

    def abort(self) -> None:
        """Close the file and unmap the buffers now, not whenever the object is collected.  Never raises."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for buf in (self._carry, self._stage):
            try:
                if buf is not None:
                    buf.close()
            except BufferError:
                pass  # a traceback being raised still holds a view of it: unmapped when that is collected

    def _append_carry(self, data: memoryview) -> None:
        self._carry[self._fill : self._fill + len(data)] = data
        self._fill += len(data)
        self.size += len(data)
        if self._fill == ALIGN:
            self._pwrite(memoryview(self._carry), self.size - ALIGN)
            self._fill = 0

    def _bounce(self, data: memoryview) -> None:
        if self._stage is None:
            self._stage = mmap.mmap(-1, _STAGE)
        for pos in range(0, len(data), _STAGE):
            chunk = data[pos : pos + _STAGE]
            self._stage[: len(chunk)] = chunk
            self._pwrite(memoryview(self._stage)[: len(chunk)], self.size + pos)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        pos = 0
        while pos < len(view):
            try:
                pos += os.pwrite(self._fd, view[pos:], offset + pos)
            except OSError as err:
                if err.errno not in _NO_DIRECT | _NO_DIRECT_MEMORY:
                    raise
                self._stop_direct(err)

    def _stop_direct(self, err: OSError) -> None:
        """The file system took O_DIRECT at open but refuses it on a write: go through the cache from now on."""
        import fcntl  # POSIX only, like O_DIRECT itself

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & _O_DIRECT:
            raise err
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)

    def _write_buffered(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            pos += os.write(self._fd, data[pos:])
        self.size += len(data)
        if self._fsync and hasattr(os, "posix_fadvise"):  # start writeback now, not all at the final fsync
            os.posix_fadvise(self._fd, self.size - len(data), len(data), os.POSIX_FADV_DONTNEED)
