"""Merging into quantized base parameters: dequantize, add ΔW in float32, requantize or write dequantized.

ΔW is never added to stored quantized values.  Each quantized parameter the merge touches streams
through its codec (:mod:`loratools.io.quant`) a row block at a time, the block aligned to the
scale blocks: ``W = dequantize(parts)`` (float32), ``W' = W + ΔW`` by the same float32 row-block
arithmetic as a float base (:class:`~loratools.merging.kernels.Kernel`), then

* ``--dtype keep``: ``quantize(W')`` with fresh scales by the format's own rule; the weight and
  the scale tensors it owns are rewritten, ``quantization_config`` and the index kept.  The written
  scales follow their weight in the output file (safetensors writers put F32 scales first), so each
  is ready when written; a scale stored in another shard than its weight is computed with it.
  Requantization can erase a small ΔW: :class:`Survival` measures ‖Q(W + ΔW) − Q(W)‖ / ‖ΔW‖ per
  tensor, with Q(W) = W the dequantized base.
* ``--dtype bf16|fp16|fp32``: every quantized parameter is written dequantized (merged or not),
  under its logical name, its companions dropped from shards and index, ``quantization_config``
  dropped from config.json.

Refused in one line before anything is written: ``--dtype keep`` on a parameter whose codec cannot
requantize (GPTQ, AWQ, bnb need calibration data), a dequantized output while some base tensor is
quantized in a format no codec reads (it would stay quantized without its config), and PiSSA/OLoRA
residual inits on a quantized parameter.  This path computes on the CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import MergeError
from ..io.checkpoint import Checkpoint
from ..io.quant.base import Codec, LowRank, QuantTensor
from ..io.quant.registry import QuantMap, codec, read_stored
from ..io.streaming import Pending, Transform
from ..io.tensorfile import Header
from ..scratch import buffer as scratch
from .kernels import BLOCK, Kernel

LOW_SURVIVAL = 0.5  # below this fraction of ‖ΔW‖ surviving requantization, the merge warns
_CPU = torch.device("cpu")
_CPUS = os.cpu_count() or 1


@dataclass
class Survival:
    """Squared norms summed over one tensor's row blocks: ‖ΔW‖² and ‖Q(W + ΔW) − Q(W)‖²."""

    delta_sq: float = 0.0
    kept_sq: float = 0.0

    @property
    def fraction(self) -> float | None:
        return math.sqrt(self.kept_sq / self.delta_sq) if self.delta_sq > 0 else None


@dataclass
class Companions:
    """The jobs' small companion tensors (scales), read a shard's worth at a time when the first of them is asked for:
    one pass over a shard's header instead of one per parameter, on the thread that hands out row blocks.  Each is
    handed out once, then dropped; a batch holds at most :data:`COMPANION_BATCH` bytes."""

    checkpoint: Checkpoint
    pending: set[str]  # small companions not read yet
    held: dict[str, torch.Tensor] = field(default_factory=dict)

    def take(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors ``keys`` (read now, with others of their shard when small)."""
        wanted = [k for k in keys if k not in self.held]
        shards = {self.checkpoint.shard_of(k).name for k in wanted}
        batch, size = list(wanted), sum(self.checkpoint.tensors[k].nbytes for k in wanted)
        for k in sorted(self.pending - set(wanted)):
            info = self.checkpoint.tensors[k]
            if self.checkpoint.shard_of(k).name in shards and size + info.nbytes <= COMPANION_BATCH:
                batch.append(k)
                size += info.nbytes
        if batch:
            self.held |= read_stored(self.checkpoint, batch)
            self.pending -= set(batch)
        return {k: self.held.pop(k) for k in keys}


COMPANION_BATCH = 1 << 26  # bytes of companions read ahead in one batch
_SMALL_COMPANION = 1 << 20  # bytes: companions up to this size are read in batches


@dataclass
class QuantJob:
    """One quantized base parameter through a merge: its codec, its kernel (None: dequantized only), its outputs."""

    q: QuantTensor
    codec: Codec
    kernel: Kernel | None
    keep: bool
    checkpoint: Checkpoint
    pool: ThreadPoolExecutor | None
    companions: Companions
    survival: Survival = field(default_factory=Survival)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # rewritten companions by role (keep)
    early: torch.Tensor | None = None  # the primary's output, when a companion asked first
    started: bool = False  # its row blocks were handed out (the main thread's flag)
    finish: Pending | None = None  # waits for the row blocks handed to the pool (it may be called again, at once)
    done: bool = False

    @property
    def rewritten(self) -> tuple[str, ...]:
        """Companion roles the requantization rewrites (the others pass through unchanged)."""
        return self.codec.rewritten(self.q) if self.keep else ()

    def primary(self) -> Transform:
        def run(src: torch.Tensor, dst: torch.Tensor) -> Pending | None:
            if self.done and self.early is not None:
                dst.copy_(self.early.reshape(dst.shape))
                self.early = None
                return None
            return self._run(src, dst)

        return run

    def companion(self, role: str) -> Transform:
        def run(src: torch.Tensor, dst: torch.Tensor) -> Pending | None:
            if not self.started:  # the scale is written before its weight (another shard): compute the weight now
                key = self.q.primary_key
                stored = _read(self.checkpoint, key)
                self.early = torch.empty(stored.shape, dtype=stored.dtype)
                running = self._run(stored, self.early)
                if running is not None:
                    running()
            finish = self.finish
            if self.done or finish is None:
                dst.copy_(self.outputs[role].reshape(dst.shape))
                return None

            def copy() -> None:  # once the weight's row blocks are done (the writer asks, in file order)
                finish()
                dst.copy_(self.outputs[role].reshape(dst.shape))

            return copy

        return run

    def _run(self, src: torch.Tensor, dst: torch.Tensor) -> Pending | None:
        """Hands the row blocks to the pool and returns what waits for them (None when they ran here, already done)."""
        q, c = self.q, self.codec
        shapes = {role: self.checkpoint.tensors[key].shape for role, key in q.parts.items()}
        parts = {q.primary: src.reshape(shapes[q.primary])}
        companions = q.companions
        if companions:
            loaded = self.companions.take(list(companions.values()))
            parts |= {role: loaded[key] for role, key in companions.items()}
        rows = q.shape[0]
        align = c.row_align(q)
        cols = math.prod(q.shape[1:])
        edit = _prepared(self.kernel, (rows, cols)) if self.kernel is not None else None
        step = rows if edit is not None and edit.norm_cols else max(align, (BLOCK // max(1, cols)) // align * align)
        if self.keep and edit is not None and edit.adds_low_rank and c.streams_low_rank(q):
            step = max(step, -(-rows // _CPUS // align) * align)  # no copy of the rows: a block a CPU (measured best)
        self.outputs = {role: torch.empty_like(parts[role]) for role in self.rewritten}
        out_primary = dst.reshape(shapes[q.primary]) if self.keep else dst.reshape(q.shape)

        def block(r0: int) -> tuple[float, float]:
            r1 = min(rows, r0 + step)
            if not self.keep:
                base = c.dequantize(q, parts, (r0, r1))
                x = _merged(edit, base, r0, r1) if edit is not None else base
                out_primary[r0:r1].copy_(x)
                return 0.0, 0.0
            out = {q.primary: _rows(out_primary, c.part_rows(q, q.primary, (r0, r1)))}
            out |= {role: _rows(self.outputs[role], c.part_rows(q, role, (r0, r1))) for role in self.rewritten}
            assert edit is not None  # jobs() requantizes edited parameters only; the rest pass through byte for byte
            terms = edit.low_rank(r0, r1)  # jobs() refused residual inits on quantized tensors
            low_rank = LowRank(terms) if terms is not None else None
            return c.requantize(q, parts, (r0, r1), lambda base: _merged(edit, base, r0, r1), out, low_rank=low_rank)

        starts = range(0, rows, step)
        self.started = True
        if self.pool is None or len(starts) == 1:
            self._sum([block(r) for r in starts])
            return None
        futures = [self.pool.submit(block, r) for r in starts]

        def finish() -> None:  # the writer's thread, in file order (or this one, at once)
            if futures:
                self._sum([f.result() for f in futures])
                futures.clear()  # nothing left holding the source rows

        self.finish = finish
        return finish

    def _sum(self, sums: list[tuple[float, float]]) -> None:
        """The survival from each block's (kept², delta²); the job is done."""
        self.survival = Survival(sum(d for _, d in sums), sum(k for k, _ in sums))
        self.done = True


def _merged(edit: Kernel, base: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Merged logical rows ``r0:r1`` from dequantized ``base`` (left as it was), in this thread's reused buffer."""
    flat = base.reshape(r1 - r0, -1)
    return edit.rows(flat, r0, r1, scratch("merge", 2 * flat.numel())).reshape(base.shape)


def _rows(t: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return t[span[0] : span[1]]


def _prepared(kernel: Kernel, shape: tuple[int, int]) -> Kernel:
    """The kernel on the CPU with a merge method's whole-tensor selection done once, so row blocks only join."""
    edit = kernel.to(_CPU)
    if edit.combination is not None:
        term = edit.combination.term(edit.terms, shape, edit.key, _CPU, None)
        edit = replace(edit, terms=(term,), combination=None)
    return edit


def _read(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    return read_stored(checkpoint, [key])[key]


def jobs(
    checkpoint: Checkpoint, quant: QuantMap, kernels: Mapping[str, Kernel], dtype: str | None, pool: ThreadPoolExecutor | None
) -> dict[str, QuantJob]:
    """The quantized parameters this merge writes through their codecs (logical key -> job), or the one-line refusal.

    ``dtype`` None keeps the base's format (only edited parameters are requantized, the rest pass
    through byte for byte); a float dtype writes every quantized parameter dequantized.
    """
    keep = dtype is None
    if not keep and quant.unhandled:
        names = sorted(quant.unhandled)
        raise MergeError(
            f"--dtype writes a dequantized model, but {len(names)} base tensor(s) are quantized in a format loratools cannot "
            f"dequantize ({names[0]}: {quant.unhandled[names[0]]}); they would stay quantized without their quantization_config",
            path=checkpoint.root,
        )
    found: dict[str, QuantJob] = {}
    companions = Companions(checkpoint, set())
    for key, q in quant.params.items():
        kernel = kernels.get(key)
        kernel = kernel if kernel is not None and not kernel.trivial else None
        if keep and kernel is None:
            continue
        c = codec(q.codec)
        if keep and not c.requantizable:
            raise MergeError(
                f"{key} is {q.label}, which cannot be requantized without calibration data, so --dtype keep cannot write it; "
                "merge with --dtype bf16 to write a dequantized model",
                path=checkpoint.root,
            )
        if kernel is not None and kernel.residual is not None:
            raise MergeError(
                f"a {kernel.residual.family} residual init cannot be rebuilt on quantized base tensor {key}", path=checkpoint.root
            )
        found[key] = QuantJob(q, c, kernel, keep, checkpoint, pool, companions)
        companions.pending |= {k for k in q.companions.values() if checkpoint.tensors[k].nbytes <= _SMALL_COMPANION}
    for c in {id(j.codec): j.codec for j in found.values()}.values():
        c.prepare()
    return found


@dataclass(frozen=True)
class ShardParts:
    """What the quantized jobs change in one shard's :class:`~loratools.io.streaming.FilePlan`."""

    dtypes: dict[str, str]
    transforms: dict[str, Transform]
    shapes: dict[str, tuple[int, ...]]
    dropped: frozenset[str]
    renamed: dict[str, str]
    after: dict[str, str]


def shard_parts(header: Header, found: Mapping[str, QuantJob], dtype: str | None) -> ShardParts:
    """The dtypes, transforms, shapes, dropped, renamed and reordered tensors of one shard for the jobs."""
    dtypes: dict[str, str] = {}
    transforms: dict[str, Transform] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dropped: set[str] = set()
    renamed: dict[str, str] = {}
    after: dict[str, str] = {}
    for job in found.values():
        q = job.q
        primary = q.primary_key
        if primary in header.tensors:
            name = primary if job.keep else q.key
            if name != primary:
                renamed[primary] = name
            transforms[name] = job.primary()
            dtypes[name] = header.tensors[primary].dtype if job.keep else str(dtype)
            if not job.keep:
                shapes[name] = q.shape
        for role, key in q.companions.items():
            if key not in header.tensors:
                continue
            if not job.keep:
                dropped.add(key)
            elif role in job.rewritten:
                transforms[key] = job.companion(role)
                if primary in header.tensors:
                    after[key] = primary
    return ShardParts(dtypes, transforms, shapes, frozenset(dropped), renamed, after)


def survival(found: Mapping[str, QuantJob]) -> tuple[dict[str, float], float | None]:
    """Per edited tensor and in total, the fraction of ‖ΔW‖ the requantized weights keep."""
    per = {k: f for k, j in sorted(found.items()) if j.keep and (f := j.survival.fraction) is not None}
    delta = sum(j.survival.delta_sq for j in found.values() if j.keep)
    kept = sum(j.survival.kept_sq for j in found.values() if j.keep)
    return per, (math.sqrt(kept / delta) if delta > 0 else None)


def survival_warnings(per: Mapping[str, float], total: float | None) -> list[str]:
    """One line when the total is low, one naming how many tensors (and the worst) keep less than LOW_SURVIVAL."""
    lines: list[str] = []
    low = sorted((f, k) for k, f in per.items() if f < LOW_SURVIVAL)
    if total is not None and total < LOW_SURVIVAL:
        lines.append(f"only {total:.0%} of ‖ΔW‖ survives requantization in total; most of the adapter is rounded away (try --dtype bf16)")
    if low:
        f, k = low[0]
        lines.append(f"{k}: {len(low)} tensor(s) keep less than {LOW_SURVIVAL:.0%} of ‖ΔW‖ after requantization (this one {f:.0%})")
    return lines


def describe(quant: QuantMap) -> dict[str, Any]:
    """A base's quantization for people and --json: method, codecs with their tensor counts, unhandled tensors."""
    codecs: dict[str, int] = {}
    labels: dict[str, str] = {}
    for q in quant.params.values():
        codecs[q.codec] = codecs.get(q.codec, 0) + 1
        labels.setdefault(q.codec, q.label)
    return {"method": quant.method, "codecs": codecs, "labels": labels, "unhandled": dict(sorted(quant.unhandled.items()))}
