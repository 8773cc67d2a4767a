"""Stream safetensors files through per-tensor transforms, overlapping reads, compute and writes.

An output file's header is known from its input's, so each output is written front to back in one
pass: the header, then every tensor in file order, appended by a :class:`~loratools.sink.Sink`
(around the page cache where the file system allows).  Tensors nobody transforms pass through as
bytes mapped from the base's page cache.  The others are mapped from the page
cache by a reader thread (no copy; or, when a GPU computes, copied into a small pool of pinned
buffers so host-to-device copies run asynchronously), transformed by the caller on the main thread
into a pool of output buffers, and written by a writer thread while the next tensor is computed.
Memory is bounded by the queues and pools, a few times the largest transformed tensor and never
the model: a 70B checkpoint streams on a machine with a fraction of its size in RAM.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DiskSpaceError, FormatError
from .atomic import atomic_output
from .checkpoint import INDEX_NAME, Checkpoint
from .files import NO_SPACE, open_regular
from .mirror import CONFIG_NAME, check_free_space, copy_side_files, side_files, update_config, write_index
from .pipeline import Stopped, Worker, get, put
from .sink import ALIGN, Sink
from .tensorfile import DTYPES, ITEMSIZE, Header, TensorInfo, encode_header, tensor_bytes

Pending = Callable[[], None]
"""Returns once the transform that gave it has filled its ``dst`` (raising what the transform raised)."""
Transform = Callable[[torch.Tensor, torch.Tensor], Pending | None]
"""Fills ``dst`` from ``src``; both are 2-D (rows, cols) CPU views, ``src`` in the stored dtype, ``dst`` in the output one.

It may return before ``dst`` is full, with a :data:`Pending` (work still running on a pool): the
writer calls it before writing ``dst``, and ``src`` is kept (out of the input pool) until then, so
the next tensors are read and handed out meanwhile."""
Progress = Callable[[int], None]
"""Called with the number of output bytes just written."""

_POOL = 2  # buffers per pool: the reader runs one tensor ahead, the writer one behind
_CPU_OUT = 3  # CPU output buffers: the writer up to two behind, so a slow direct write does not hold back compute
_SMALL = 1 << 20  # bytes: a computed output this small (an FP8 weight's scales) gets a buffer of its own
_CHUNK = 16 * 2**20  # bytes per piece of an untouched tensor passed through


@dataclass(frozen=True)
class FilePlan:
    """How one output file derives from one input file: the output dtype, shape and transform per tensor.

    With every dtype and shape unchanged and nothing added, the input's header bytes are reused
    verbatim, so tensor order, offsets and ``__metadata__`` are exactly the input's.  ``shapes``
    gives a tensor a new output shape (a vocabulary grown by the adapter): its transform then fills a
    ``dst`` with more rows than ``src``.  ``added`` appends tensors the input does not store, each
    computed from a tensor of this file (``lm_head.weight`` from the tied ``embed_tokens.weight``
    when a merge unties them), after the input's tensors, in the order given.  ``dropped`` input
    tensors are not written (the scales of a quantized weight written dequantized); ``renamed`` ones
    are written under a new name (keys of ``dtypes``/``transforms``/``shapes`` are output names);
    ``after`` writes a tensor right behind another of this file (a scale behind the weight whose
    requantization computes it), the rest keeping file order.
    """

    header: Header
    dtypes: Mapping[str, str]
    transforms: Mapping[str, Transform]
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    added: Mapping[str, str] = field(default_factory=dict)  # new tensor name -> source tensor name in this file
    dropped: frozenset[str] = frozenset()
    renamed: Mapping[str, str] = field(default_factory=dict)  # input name -> output name
    after: Mapping[str, str] = field(default_factory=dict)  # input name -> the input name it follows

    @property
    def tensors(self) -> list[TensorInfo]:
        """The input tensors written, in output order."""
        ordered = sorted(self.header.tensors.values(), key=lambda t: t.start)
        kept = [t for t in ordered if t.name not in self.dropped and self.after.get(t.name) not in self.header.tensors]
        followers: dict[str, list[TensorInfo]] = {}
        for t in ordered:
            if t.name not in self.dropped and self.after.get(t.name) in self.header.tensors:
                followers.setdefault(self.after[t.name], []).append(t)
        return [f for t in kept for f in (t, *followers.get(t.name, ()))]

    @property
    def outputs(self) -> list[tuple[str, TensorInfo]]:
        """(output name, the input tensor it is read from), in output file order."""
        own = [(self.renamed.get(t.name, t.name), t) for t in self.tensors]
        return own + [(name, self.header.tensors[src]) for name, src in self.added.items()]

    @property
    def reordered(self) -> bool:
        return bool(self.dropped or self.renamed) or [t.name for t in self.tensors] != list(self.header.tensors)

    def out_shape(self, name: str, info: TensorInfo) -> tuple[int, ...]:
        return self.shapes.get(name, info.shape)

    def out_nbytes(self, name: str, info: TensorInfo) -> int:
        return math.prod(self.out_shape(name, info)) * ITEMSIZE[self.dtypes[name]]

    def computed(self, name: str, info: TensorInfo) -> bool:
        return name in self.transforms or self.dtypes[name] != info.dtype or self.out_shape(name, info) != info.shape

    def header_bytes(self) -> bytes:
        same = all(self.dtypes[name] == t.dtype and self.out_shape(name, t) == t.shape for name, t in self.outputs)
        if not self.added and not self.reordered and same:
            with open_regular(self.header.path) as fh:
                return fh.read(self.header.data_start)
        plan = [(name, self.dtypes[name], self.out_shape(name, info)) for name, info in self.outputs]
        return encode_header(plan, self.header.metadata)[0]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data in the output file (the index's ``total_size`` sums these)."""
        return sum(self.out_nbytes(name, info) for name, info in self.outputs)

    @property
    def size(self) -> int:
        return len(self.header_bytes()) + self.data_bytes


def _pool(nbytes: int, pin: bool, room: int = 0, count: int = _POOL) -> queue.Queue:
    """``count`` buffers of ``nbytes`` plus ``room`` bytes to place data congruent to its file offset (see :func:`_placed`)."""
    pool: queue.Queue = queue.Queue()
    for _ in range(count):
        pool.put(torch.empty(nbytes + room if nbytes else 0, dtype=torch.uint8, pin_memory=pin))
    return pool


def _placed(buf: torch.Tensor, offset: int, n: int, itemsize: int) -> torch.Tensor:
    """``n`` bytes of ``buf``, at an address ≡ ``offset`` (mod ALIGN) when the buffer has room for it.

    The sink writes data so placed without a copy.  Placement is skipped (the sink then bounces the
    bytes) when the buffer has no spare room or when the shift would misalign the elements, as a
    tensor stored at an offset that is not a multiple of its item size would.
    """
    shift = (offset - buf.data_ptr()) % ALIGN
    if shift % itemsize or shift + n > buf.numel():
        shift = 0
    return buf[shift : shift + n]


def _matrix(buf: torch.Tensor, dtype: str, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """``buf``'s first ``nbytes`` as a (rows, cols) tensor: rows is the leading dimension."""
    rows = shape[0] if shape else 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return buf[:nbytes].view(DTYPES[dtype]).reshape(rows, cols)


def _pieces(plan: FilePlan, name: str, info: TensorInfo) -> list[tuple[int, int]]:
    """File ranges read ahead for one tensor: whole when transformed, else in chunks of at most _CHUNK bytes.

    Untouched tensors pass through in chunks so a huge one (a 70B model's embeddings) is never
    mapped whole; transformed ones are read whole.
    """
    if plan.computed(name, info) or info.nbytes <= _CHUNK:
        return [(info.start, info.end)]
    return [(a, min(a + _CHUNK, info.end)) for a in range(info.start, info.end, _CHUNK)]


def _map(fd: int, start: int, end: int) -> torch.Tensor:
    """Bytes ``start:end`` of the file as a read-only view of the page cache: no copy, prefaulted by MAP_POPULATE.

    The mapping lives as long as the returned tensor, so it is unmapped as soon as the tensor is done.
    Its address is congruent to ``start`` modulo the page size, which direct writes need.
    """
    if end == start:
        return torch.empty(0, dtype=torch.uint8)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mapped = mmap.mmap(fd, end - base, flags=flags, prot=mmap.PROT_READ, offset=base)
    with warnings.catch_warnings():  # read-only on purpose: sources are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start - base)


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a file that ends first is a :class:`FormatError`."""
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n == 0:
            raise FormatError(f"file is truncated: expected data up to byte {offset + len(view)}", path=path)
        pos += n


def _read_all(fd: int, plan: FilePlan, pool: queue.Queue | None, reads: queue.Queue, stop: threading.Event) -> None:
    """Read ahead in file order: map each piece from the page cache, or, when a GPU computes, copy
    the tensors it transforms into pinned pool buffers (so uploads run asynchronously)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    for name, info in plan.outputs:
        if pool is not None and plan.computed(name, info):
            buf = get(pool, stop)
            _pread_into(fd, tensor_bytes(buf[: info.nbytes]), info.start, plan.header.path)
            put(reads, buf, stop)
            continue
        for start, end in _pieces(plan, name, info):
            put(reads, _map(fd, start, end), stop)


def _write_all(
    sink: Sink, writes: queue.Queue, pool: queue.Queue, sources: queue.Queue | None, progress: Progress, stop: threading.Event
) -> None:
    """Append each queued piece to the sink once its transform is done; output buffers go back to their pool once
    written, pooled sources once their transform is done."""
    while (item := get(writes, stop)) is not None:
        data, buf, pending, source = item
        if pending is not None:
            pending()
        if source is not None and sources is not None:
            sources.put(source)
        sink.write(data)
        if buf is not None:
            pool.put(buf)
        progress(data.numel())
        del item, data, pending, source  # a mapped source is unmapped here


def _cast(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


def stream_files(
    jobs: list[tuple[FilePlan, Path]], *, pin: bool = False, direct: bool = True, fsync: bool = False, progress: Progress | None = None
) -> None:
    """Write each plan's output file; on any error or interrupt, stop every stage and re-raise.

    ``direct`` writes around the page cache where the file system allows (:mod:`loratools.sink`).
    ``fsync`` flushes each file to stable storage before returning (durability against power loss;
    like ``cp`` and ``save_pretrained``, the default leaves that to the OS).
    """
    computed = [(p, n, t) for p, _ in jobs for n, t in p.outputs if p.computed(n, t)]
    in_pool = _pool(max((t.nbytes for _, _, t in computed), default=0), pin) if pin else None
    # Pinned buffers get no placement room: the caching host allocator rounds sizes up to a power
    # of two, so 4 KiB more on a power-of-two tensor would double them; their writes bounce instead.
    # Pinned buffers (a GPU computes) stay two: pinned memory is scarce and sized up to a power of two, and the third
    # was measured on the CPU only.
    out_nbytes = max((p.out_nbytes(n, t) for p, n, t in computed), default=0)
    out_pool = _pool(out_nbytes, pin, room=0 if pin else ALIGN, count=_POOL if pin else _CPU_OUT)
    for plan, dst in jobs:
        _stream_file(plan, dst, in_pool, out_pool, progress or (lambda n: None), direct, fsync)


def _stream_file(
    plan: FilePlan, dst: Path, in_pool: queue.Queue | None, out_pool: queue.Queue, progress: Progress, direct: bool, fsync: bool
) -> None:
    sink = Sink(dst, direct=direct, fsync=fsync)
    try:
        header = plan.header_bytes()
        sink.write(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        progress(len(header))
        with open_regular(plan.header.path) as src:
            _run_stages(plan, src.fileno(), len(header), sink, in_pool, out_pool, progress)
        sink.close()
    except OSError as err:
        sink.abort()
        if err.errno in NO_SPACE:
            raise DiskSpaceError("no space left on the device while writing this file", path=dst) from None  # the sink's names none
        raise
    except BaseException:
        sink.abort()
        raise


def _run_stages(
    plan: FilePlan, src: int, offset: int, sink: Sink, in_pool: queue.Queue | None, out_pool: queue.Queue, progress: Progress
) -> None:
    """Reader and writer threads around the main thread's transforms; re-raises the first failure."""
    stop = threading.Event()
    reads: queue.Queue = queue.Queue(maxsize=_POOL)
    writes: queue.Queue = queue.Queue(maxsize=2 * _CPU_OUT)
    workers = [
        Worker(_read_all, stop, src, plan, in_pool, reads, stop),
        Worker(_write_all, stop, sink, writes, out_pool, in_pool, progress, stop),
    ]
    for w in workers:
        w.start()
    try:
        _feed(plan, offset, reads, writes, in_pool, out_pool, stop)
        put(writes, None, stop)
    except Stopped:
        pass  # a stage failed: its error is raised below
    except BaseException:
        stop.set()
        raise
    finally:
        _join(workers, stop)
    for w in workers:
        if w.error is not None:
            raise w.error


def _join(workers: list[Worker], stop: threading.Event) -> None:
    """Wait for every stage; interrupted while waiting, stop them first so none outlives its file."""
    try:
        for w in workers:
            w.join()
    except BaseException:
        stop.set()
        for w in workers:
            w.join()
        raise


def _feed(
    plan: FilePlan,
    offset: int,
    reads: queue.Queue,
    writes: queue.Queue,
    in_pool: queue.Queue | None,
    out_pool: queue.Queue,
    stop: threading.Event,
) -> None:
    """The main thread's part, in file order: pass untouched pieces through, transform the others.

    ``offset``: where the first tensor starts in the output file; each output is placed in its
    buffer congruent to its own offset, so the sink can write it straight from there.
    """
    for name, info in plan.outputs:
        if not plan.computed(name, info):
            for _ in _pieces(plan, name, info):
                put(writes, (get(reads, stop), None, None, None), stop)
            offset += info.nbytes
            continue
        src = get(reads, stop)
        n = plan.out_nbytes(name, info)
        small = n <= _SMALL  # its own buffer: a pooled one would wait for the tensor before it to be written
        out = torch.empty(n + ALIGN, dtype=torch.uint8) if small else get(out_pool, stop)
        dst = _placed(out, offset, n, ITEMSIZE[plan.dtypes[name]])
        pending = plan.transforms.get(name, _cast)(
            _matrix(src, info.dtype, info.shape, info.nbytes), _matrix(dst, plan.dtypes[name], plan.out_shape(name, info), n)
        )
        if in_pool is not None and pending is None:
            in_pool.put(src)
        put(writes, (dst, None if small else out, pending, src if pending is not None else None), stop)
        del src, pending  # a mapped source is unmapped here, or once the writer is done with its transform
        offset += n


def _disk_full(err: OSError, tmp: Path, out: Path) -> DiskSpaceError:
    """The disk filled while writing into temporary ``tmp``: name the file of ``out`` it was to become."""
    where = Path((err.path if isinstance(err, DiskSpaceError) else None) or err.filename or tmp)
    named = out / where.relative_to(tmp) if where.is_relative_to(tmp) and where != tmp else out
    return DiskSpaceError(
        "no space left on the device while writing it; nothing was written (the partial output was removed): "
        "free some space or write elsewhere with -o",
        path=named,
    )


@dataclass(frozen=True)
class WriteOptions:
    """How a checkpoint is written.

    ``force``: replace an existing output (only once the new one is complete).  ``direct``: write
    around the page cache where the file system allows.  ``fsync``: flush to stable storage before
    the output appears.  ``progress``: called with (bytes written, bytes total).
    """

    force: bool = False
    direct: bool = True
    fsync: bool = False
    progress: Callable[[int, int], None] | None = None


def write_checkpoint(
    checkpoint: Checkpoint,
    plans: list[FilePlan],
    out: Path,
    options: WriteOptions,
    *,
    pin: bool = False,
    config: Mapping[str, Any] | None = None,
    removed_config: Collection[str] = (),
) -> int:
    """Write a checkpoint mirroring ``checkpoint`` to ``out``, atomically; returns the bytes of weights written.

    One output shard per plan (same names and order), the index with its new ``total_size`` and the
    plans' added (and renamed) tensors less their dropped ones, and the side files, ``config.json``
    with ``config``'s fields set and ``removed_config``'s deleted.  Free
    space is checked first.  ``pin``: stage tensors in pinned memory (GPU compute).
    """
    extras = [] if checkpoint.is_file else side_files(checkpoint.root, {s.name for s in checkpoint.shards})
    total = sum(p.size for p in plans)
    check_free_space(out.parent, total + sum((checkpoint.root / p).stat().st_size for p in extras))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if options.progress is not None:
            options.progress(done[0], total)

    with atomic_output(out, force=options.force, directory=not checkpoint.is_file) as tmp:
        try:
            jobs = [(p, tmp if checkpoint.is_file else tmp / s.name) for p, s in zip(plans, checkpoint.shards, strict=True)]
            stream_files(jobs, pin=pin, direct=options.direct, fsync=options.fsync, progress=tick)
            if checkpoint.index is not None:
                pairs = list(zip(plans, checkpoint.shards, strict=True))
                added = {name: s.name for p, s in pairs for name in (*p.added, *p.renamed.values())}
                removed = [name for p, _ in pairs for name in (*p.dropped, *p.renamed)]
                write_index(checkpoint.index, sum(p.data_bytes for p in plans), tmp / INDEX_NAME, added, removed)
            copy_side_files(checkpoint.root, extras, tmp)
            if not checkpoint.is_file:
                update_config(tmp / CONFIG_NAME, config or {}, removed_config)
        except OSError as err:
            if err.errno not in NO_SPACE and not isinstance(err, DiskSpaceError):
                raise
            raise _disk_full(err, tmp, out) from None
    return total
