"""Stream safetensors files through per-tensor transforms, overlapping reads, compute and writes.

An output file's header is known from its input's, so each output is written front to back in one
pass: the header, then every tensor in file order.  Tensors nobody transforms are copied by the
kernel (``copy_file_range``) without passing through Python.  The others are mapped from the page
cache by a reader thread (no copy; or, when a GPU computes, copied into a small pool of pinned
buffers so host-to-device copies run asynchronously), transformed by the caller on the main thread
into a pool of output buffers, and written by a writer thread while the next tensor is computed.
Memory is bounded by the queues and pools, a few times the largest transformed tensor and never
the model: a 70B checkpoint streams on a machine with a fraction of its size in RAM.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import shutil
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_output
from .checkpoint import INDEX_NAME, Checkpoint
from .errors import DiskSpaceError, FormatError
from .tensorfile import DTYPES, ITEMSIZE, Header, TensorInfo, encode_header

Transform = Callable[[torch.Tensor, torch.Tensor], None]
"""Fills ``dst`` from ``src``; both are 2-D (rows, cols) CPU views, ``src`` in the stored dtype, ``dst`` in the output one."""
Progress = Callable[[int], None]
"""Called with the number of output bytes just written."""

_POOL = 2  # buffers per pool: the reader runs one tensor ahead, the writer one behind
_TICK = 0.1  # seconds between checks for a failed worker while waiting on a queue
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_COPY_CHUNK = 64 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SKIP_DIRS = {".git", ".cache", ".huggingface"}


@dataclass(frozen=True)
class FilePlan:
    """How one output file derives from one input file: the output dtype and transform per tensor.

    With every dtype unchanged the input's header bytes are reused verbatim, so tensor order,
    offsets and ``__metadata__`` are exactly the input's.
    """

    header: Header
    dtypes: Mapping[str, str]
    transforms: Mapping[str, Transform]

    @property
    def tensors(self) -> list[TensorInfo]:
        return sorted(self.header.tensors.values(), key=lambda t: t.start)

    def out_nbytes(self, info: TensorInfo) -> int:
        return info.numel * ITEMSIZE[self.dtypes[info.name]]

    def computed(self, info: TensorInfo) -> bool:
        return info.name in self.transforms or self.dtypes[info.name] != info.dtype

    def header_bytes(self) -> bytes:
        if all(self.dtypes[t.name] == t.dtype for t in self.tensors):
            with open(self.header.path, "rb") as fh:
                return fh.read(self.header.data_start)
        plan = [(t.name, self.dtypes[t.name], t.shape) for t in self.tensors]
        return encode_header(plan, self.header.metadata)[0]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data in the output file (the index's ``total_size`` sums these)."""
        return sum(self.out_nbytes(t) for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header_bytes()) + self.data_bytes


class _Stopped(Exception):
    """Raised inside a pipeline stage when another stage failed or was interrupted."""


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=_TICK)
            return
        except queue.Full:
            continue
    raise _Stopped


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=_TICK)
        except queue.Empty:
            continue
    raise _Stopped


class _Worker(threading.Thread):
    """A pipeline stage; its first error stops the others and is re-raised by the main thread."""

    def __init__(self, fn: Callable[..., None], stop: threading.Event, *args: Any):
        super().__init__(daemon=True)
        self._fn, self._stop_event, self._args = fn, stop, args
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn(*self._args)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
            self._stop_event.set()


def _pool(nbytes: int, pin: bool) -> queue.Queue:
    pool: queue.Queue = queue.Queue()
    for _ in range(_POOL):
        pool.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin))
    return pool


def _bytes(buf: torch.Tensor, n: int) -> memoryview:
    return memoryview(buf[:n].numpy()).cast("B")  # type: ignore[arg-type]


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n == 0:
            raise FormatError(f"file is truncated: expected data up to byte {offset + len(view)}", path=path)
        pos += n


def _write_exact(fd: int, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        pos += os.write(fd, view[pos:])


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel when it can."""
    kernel = hasattr(os, "copy_file_range")  # Linux only
    while count:
        try:
            if not kernel:
                raise OSError(errno.ENOSYS, "no copy_file_range")
            n = os.copy_file_range(src, dst, min(count, 1 << 30), offset)
        except OSError as err:
            if err.errno not in _NO_COPY_FILE_RANGE:
                raise
            kernel = False
            n = os.write(dst, os.pread(src, min(count, _COPY_CHUNK), offset))
        if n == 0:
            raise FormatError(f"input ended early while copying byte {offset}")
        offset, count = offset + n, count - n


def _matrix(buf: torch.Tensor, dtype: str, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """``buf``'s first ``nbytes`` as a (rows, cols) tensor: rows is the leading dimension."""
    rows = shape[0] if shape else 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return buf[:nbytes].view(DTYPES[dtype]).reshape(rows, cols)


def _map(fd: int, info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes as a read-only view of the page cache: no copy, prefaulted by MAP_POPULATE.

    The mapping lives as long as the returned tensor, so it is unmapped as soon as the tensor is done.
    """
    if info.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mapped = mmap.mmap(fd, info.end - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    with warnings.catch_warnings():  # read-only on purpose: sources are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start - start)


def _read_all(fd: int, path: Path, infos: list[TensorInfo], pool: queue.Queue | None, reads: queue.Queue, stop: threading.Event) -> None:
    """Read ahead: map each tensor (CPU), or copy it into a pinned pool buffer (GPU: async uploads)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    for info in infos:
        if pool is None:
            _put(reads, (_map(fd, info), info), stop)
            continue
        buf = _get(pool, stop)
        _pread_into(fd, _bytes(buf, info.nbytes), info.start, path)
        _put(reads, (buf, info), stop)


def _write_all(src: int, dst: int, writes: queue.Queue, pool: queue.Queue, progress: Progress, fsync: bool, stop: threading.Event) -> None:
    pos = os.lseek(dst, 0, os.SEEK_CUR)
    while (item := _get(writes, stop)) is not None:
        kind, what, n = item
        if kind == "copy":
            _copy_range(src, dst, what, n)
        else:
            _write_exact(dst, _bytes(what, n))
            pool.put(what)
        if fsync and hasattr(os, "posix_fadvise"):  # start writeback now, not all at the final fsync
            os.posix_fadvise(dst, pos, n, os.POSIX_FADV_DONTNEED)
        pos += n
        progress(n)


def _cast(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


def stream_files(jobs: list[tuple[FilePlan, Path]], *, pin: bool = False, fsync: bool = False, progress: Progress | None = None) -> None:
    """Write each plan's output file; on any error or interrupt, stop every stage and re-raise.

    ``fsync`` flushes each file to stable storage before returning (durability against power loss;
    like ``cp`` and ``save_pretrained``, the default leaves that to the OS, which costs nothing on
    an idle disk and many seconds on a busy one).
    """
    computed = [(p, t) for p, _ in jobs for t in p.tensors if p.computed(t)]
    in_pool = _pool(max((t.nbytes for _, t in computed), default=0), pin) if pin else None
    out_pool = _pool(max((p.out_nbytes(t) for p, t in computed), default=0), pin)
    for plan, dst in jobs:
        _stream_file(plan, dst, in_pool, out_pool, progress or (lambda n: None), fsync)


def _stream_file(plan: FilePlan, dst: Path, in_pool: queue.Queue | None, out_pool: queue.Queue, progress: Progress, fsync: bool) -> None:
    stop = threading.Event()
    reads: queue.Queue = queue.Queue(maxsize=_POOL)
    writes: queue.Queue = queue.Queue(maxsize=2 * _POOL)
    todo = [t for t in plan.tensors if plan.computed(t)]
    with open(plan.header.path, "rb", buffering=0) as src, open(dst, "wb", buffering=0) as out:
        header = plan.header_bytes()
        _write_exact(out.fileno(), memoryview(header))
        progress(len(header))
        workers = [
            _Worker(_read_all, stop, src.fileno(), plan.header.path, todo, in_pool, reads, stop),
            _Worker(_write_all, stop, src.fileno(), out.fileno(), writes, out_pool, progress, fsync, stop),
        ]
        for w in workers:
            w.start()
        try:
            _feed(plan, reads, writes, in_pool, out_pool, stop)
            _put(writes, None, stop)
        except _Stopped:
            pass  # a worker failed: its error is raised below
        except BaseException:
            stop.set()
            raise
        finally:
            for w in workers:
                w.join()
        for w in workers:
            if w.error is not None:
                raise w.error
        if fsync:
            os.fsync(out.fileno())


def _feed(
    plan: FilePlan, reads: queue.Queue, writes: queue.Queue, in_pool: queue.Queue | None, out_pool: queue.Queue, stop: threading.Event
) -> None:
    """The main thread's part: in file order, queue a kernel copy or transform the tensor read ahead."""
    for info in plan.tensors:
        if not plan.computed(info):
            _put(writes, ("copy", info.start, info.nbytes), stop)
            continue
        buf, _ = _get(reads, stop)
        out = _get(out_pool, stop)
        n = plan.out_nbytes(info)
        src = _matrix(buf, info.dtype, info.shape, info.nbytes)
        dst = _matrix(out, plan.dtypes[info.name], info.shape, n)
        plan.transforms.get(info.name, _cast)(src, dst)
        if in_pool is not None:
            in_pool.put(buf)
        del src, buf  # a mapped source is unmapped here
        _put(writes, ("buf", out, n), stop)


def _is_weights(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def side_files(root: Path, weight_files: set[str]) -> list[Path]:
    """Everything in model directory ``root`` to copy beside merged weights: config, tokenizer, ...

    Weight files (``.safetensors``, pickles, ...) and indexes are left out, in subfolders too (Meta's
    ``original/consolidated.00.pth``): the merged output writes its own, and a stale copy of unmerged
    weights would be loaded instead of the merged ones.
    """
    keep = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name in weight_files or name.startswith(".loratools-tmp-") or name in _SKIP_DIRS:
            continue
        if path.is_file() and _is_weights(path):
            continue
        keep.append(path)
    return keep


def copy_side_files(paths: list[Path], dst: Path) -> None:
    for path in paths:
        if path.is_dir():
            skip = lambda folder, names: [n for n in names if _is_weights(Path(folder) / n) and (Path(folder) / n).is_file()]  # noqa: E731
            shutil.copytree(path, dst / path.name, symlinks=False, ignore=skip)
        else:
            shutil.copy2(path, dst / path.name)


def write_index(index: Mapping[str, Any], total_size: int, dst: Path) -> None:
    """The base's ``model.safetensors.index.json`` with ``metadata.total_size`` for the new data size."""
    out = dict(index)
    out["metadata"] = {**dict(index.get("metadata") or {}), "total_size": total_size}
    dst.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def files_size(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            total += path.stat().st_size
    return total


def check_free_space(where: Path, need: int) -> None:
    """Raise :class:`DiskSpaceError` unless the file system holding ``where`` has ``need`` bytes free."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(
            f"needs {need / 2**30:.2f} GiB free for the output but only {free / 2**30:.2f} GiB is; "
            "free some space or write elsewhere with -o",
            path=probe,
        )


def write_checkpoint(
    checkpoint: Checkpoint,
    plans: list[FilePlan],
    out: Path,
    *,
    force: bool = False,
    fsync: bool = False,
    pin: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a checkpoint mirroring ``checkpoint`` to ``out``, atomically; returns the bytes of weights written.

    One output shard per plan (same names and order), the index with its new ``total_size``, and the
    side files.  Free space is checked first; ``progress`` gets (bytes written, bytes total).
    """
    extras = [] if checkpoint.is_file else side_files(checkpoint.root, {s.name for s in checkpoint.shards})
    total = sum(p.size for p in plans)
    check_free_space(out.parent, total + files_size(extras))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    with atomic_output(out, force=force, directory=not checkpoint.is_file) as tmp:
        jobs = [(p, tmp if checkpoint.is_file else tmp / s.name) for p, s in zip(plans, checkpoint.shards, strict=True)]
        stream_files(jobs, pin=pin, fsync=fsync, progress=tick)
        if checkpoint.index is not None:
            write_index(checkpoint.index, sum(p.data_bytes for p in plans), tmp / INDEX_NAME)
        copy_side_files(extras, tmp)
    return total
