"""Bake adapters into a base checkpoint (``merge``) or take one back out (``unmerge``), streaming.

The math is PEFT's ``merge_and_unload``, per base tensor W (shapes as the checkpoint stores them):

* LoRA: W' = W + Σᵢ wᵢ·sᵢ·BᵢAᵢ, s = alpha/r (alpha/√r with rsLoRA, per module after rank/alpha
  patterns), wᵢ the weight given to adapter i (it multiplies s, as PEFT's ``scale_layer`` does).
  ΔW is stored transposed, (BA)ᵀ, for ``fan_in_fan_out`` layers (GPT-2 Conv1D) and embeddings; conv
  factors are flattened, ΔW[o] = B[o]·A, whatever the kernel size.
  PEFT rounds an embedding's ΔW to the stored dtype before adding it (and only an embedding's);
  so do we, to stay bit-identical.
* ``lora_bias``: the base bias gains Σᵢ wᵢ·sᵢ·b_i.
* DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output feature: per row of linear and conv
  weights, per column of ``fan_in_fan_out`` weights and of embeddings (PEFT's conventions).
* ``modules_to_save`` and saved ``*.base_layer.weight`` tensors replace the base tensor (LoRA terms on
  the same tensor then apply on top of the replacement, as in PEFT).

Everything is computed in float32 from the stored values and rounded once to the output dtype.
PEFT does the same, in the same order, when its adapter weights are float32 (its default: adapters
are upcast on load), so bf16 and fp16 merges are bit-identical to PEFT's (measured for plain, DoRA,
embedding and lora_bias adapters on sharded bases; tests/test_merge.py asserts it) and fp32 merges
agree to within 1e-6.  Adapters in one call are summed in order into one float32 accumulator, which
equals merging them one after another in float32 and rounding once.

DoRA in a multi-adapter merge: a DoRA module's tensor may not be touched by any other adapter, since
its renormalisation would depend on merge order; DoRA modules on tensors no other adapter touches are
fine.  ``unmerge`` refuses DoRA outright: the merged weight keeps only the direction of W + ΔW (its
norms become m), so W cannot be recovered.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from . import spec
from .adapter import Adapter, load
from .arith import check_weights
from .atomic import check_output
from .checkpoint import Checkpoint, find_weight, module_index, open_checkpoint
from .device import resolve as resolve_device
from .errors import MergeError, ShapeError
from .linalg import flat
from .streaming import FilePlan, Transform, WriteOptions, write_checkpoint
from .tensorfile import TensorInfo

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["keep", "fp16", "bf16", "fp32"]
DTYPE_CHOICES: dict[str, str | None] = {"keep": None, "fp16": "F16", "bf16": "BF16", "fp32": "F32"}
_FLOATS = ("F64", "F32", "F16", "BF16")
_LISTED = 8  # problems named in one error line; validate --base lists every one
_BLOCK = 1 << 19  # float32 elements per CPU row block: a few MiB, so temporaries stay in cache
AdapterLike = str | Path | Adapter
_scratch = threading.local()  # per-thread float32 work buffer for CPU row blocks: no page faults per block


@dataclass(frozen=True)
class Term:
    """One adapter's contribution ``scale·B·A`` to one base tensor, in float32.

    ``transposed``: the base stores (B·A)ᵀ (``fan_in_fan_out`` linears, embeddings), so base row i
    is column i of B·A.  ``rounded``: ΔW is rounded to the stored dtype before it is added, as PEFT
    does for (non-DoRA) embeddings only.  A bias term is B = b as a column and A = [[1]].
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    transposed: bool = False
    rounded: bool = False

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ΔW in the stored layout, computed as PEFT does: (B·A) first, then ·s.

        ``out``: a flat float32 scratch buffer to compute into (saves an allocation per block).
        """
        B, A = (self.B, self.A[:, r0:r1]) if self.transposed else (self.B[r0:r1], self.A)
        shape = (B.shape[0], A.shape[1])
        delta = torch.mm(B, A, out=out[: shape[0] * shape[1]].view(shape)) if out is not None else B @ A
        return (delta.T if self.transposed else delta).mul_(self.scale)

    def to(self, device: torch.device) -> Term:
        return replace(self, B=self.B.to(device), A=self.A.to(device))


@dataclass(frozen=True)
class Edit:
    """Everything that changes one base tensor: LoRA terms, a DoRA magnitude, a replacement."""

    key: str
    terms: tuple[Term, ...] = ()
    magnitude: torch.Tensor | None = None
    replacement: torch.Tensor | None = None

    @property
    def norm_cols(self) -> bool:
        """DoRA normalises per output feature: a column of the stored tensor when ΔW is transposed."""
        return any(t.transposed for t in self.terms)

    def to(self, device: torch.device) -> Edit:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Edit(self.key, tuple(t.to(device) for t in self.terms), move(self.magnitude), move(self.replacement))

    def rows(self, src: torch.Tensor, r0: int, r1: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Merged rows ``r0:r1`` in float32, from base rows ``src`` (any float dtype).

        ``scratch``: optional flat float32 buffer of at least 2·``src.numel()`` elements to work in.
        """
        n = src.numel()
        x = scratch[:n].view(src.shape) if scratch is not None else torch.empty(src.shape, dtype=torch.float32, device=src.device)
        work = scratch[n : 2 * n] if scratch is not None else None
        x.copy_(self.replacement[r0:r1] if self.replacement is not None else src)
        for term in self.terms:
            delta = term.rows(r0, r1, work)
            x.add_(delta.to(src.dtype) if term.rounded else delta)
        if self.magnitude is not None:
            norm = torch.linalg.norm(x, dim=0 if self.norm_cols else 1)
            magnitude = self.magnitude if self.norm_cols else self.magnitude[r0:r1]
            factor = magnitude / norm
            x.mul_(factor.view(1, -1) if self.norm_cols else factor.view(-1, 1))
        return x

    def transform(self, device: torch.device, pool: ThreadPoolExecutor | None = None) -> Transform:
        """The streaming step: fill the output rows from the input rows; on CPU, row blocks run on ``pool``."""
        edit = self.to(device)

        def run(src: torch.Tensor, dst: torch.Tensor) -> None:
            rows = src.shape[0]
            if device.type != "cpu":
                dst.copy_(edit.rows(src.to(device, non_blocking=True), 0, rows))  # waits for the GPU
                return
            step = rows if edit.norm_cols else max(1, _BLOCK // max(1, src.shape[1]))

            def block(r0: int) -> None:
                r1 = min(rows, r0 + step)
                need = 2 * (r1 - r0) * src.shape[1]
                if getattr(_scratch, "buf", None) is None or _scratch.buf.numel() < need:
                    _scratch.buf = torch.empty(max(need, 2 * _BLOCK), dtype=torch.float32)
                dst[r0:r1].copy_(edit.rows(src[r0:r1], r0, r1, _scratch.buf))

            if pool is None:
                for r0 in range(0, rows, step):
                    block(r0)
            else:
                list(pool.map(block, range(0, rows, step)))

        return run


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: where, from what, how much, how fast."""

    out: Path
    base: Path
    adapters: list[str]
    weights: list[float]
    device: str
    dtype: str
    shards: int
    tensors: int
    merged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "base": str(self.base),
            "adapters": self.adapters,
            "weights": self.weights,
            "device": self.device,
            "dtype": self.dtype,
            "shards": self.shards,
            "tensors": self.tensors,
            "merged": len(self.merged),
            "replaced": len(self.replaced),
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def default_out(base: str | Path) -> Path:
    """``<base>-merged`` beside the base (``<stem>-merged.safetensors`` for a single file)."""
    base = Path(base)
    if base.is_file():
        return base.with_name(f"{base.stem}-merged{base.suffix}")
    return base.with_name(f"{base.name}-merged")


def merge(
    base: str | Path,
    adapters: Sequence[AdapterLike],
    *,
    weights: Sequence[float] | None = None,
    out: str | Path | None = None,
    device: Device = "auto",
    dtype: Dtype = "keep",
    force: bool = False,
    direct: bool = True,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Write ``base`` with ``adapters`` baked in (W' = W + Σ wᵢ·ΔWᵢ) to ``out``; returns what was done.

    ``base`` is a HF model directory (``model.safetensors`` or shards + index) or one ``.safetensors``
    file; ``out`` (default :func:`default_out`) mirrors it: same files, tensor order, dtypes (unless
    ``dtype``), index and side files.  Nothing is written unless every adapter module maps to a base
    tensor of its ΔW's shape (:class:`ShapeError` lists every one that does not).  The output appears
    only when complete (a crash, Ctrl-C, kill -9 or full disk leaves none); ``fsync`` also flushes
    it to stable storage first.  ``direct`` writes around the page cache where the file system
    allows (:mod:`loratools.sink` says why); ``progress`` is called with (bytes written, bytes total).
    """
    with _own_threads() as pool:
        loaded = [a if isinstance(a, Adapter) else load(a, base=base) for a in adapters]  # base maps kohya names
        labels = [str(a) if not isinstance(a, Adapter) else f"adapter #{i + 1}" for i, a in enumerate(adapters)]
        return _merge(base, loaded, labels, weights, out, device, dtype, WriteOptions(force, direct, fsync, progress), pool)


def unmerge(
    merged: str | Path,
    adapter: AdapterLike,
    *,
    out: str | Path,
    device: Device = "auto",
    dtype: Dtype = "keep",
    force: bool = False,
    direct: bool = True,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Take ``adapter`` back out of checkpoint ``merged`` (W = W' − ΔW) into ``out``.

    Exact only up to rounding: merge and unmerge each round to the stored dtype, so the round trip
    W → W' → W'' satisfies |W'' − W| <= eps·max(|W|, |W'|) per entry (eps of the dtype: 2⁻⁷ for bf16,
    2⁻¹⁰ for fp16, 2⁻²³ for fp32), and entries where ΔW is large next to W lose most of W's
    low bits.  Measured on a tiny Llama with |ΔW| ~ |W|: about two thirds of the merged entries come
    back changed, in fp32 as in bf16/fp16; untouched tensors come back bit-identical.  DoRA and
    ``modules_to_save`` merges are refused: they replace what they touch, which cannot be undone.
    """
    label = str(adapter) if not isinstance(adapter, Adapter) else "adapter #1"
    with _own_threads() as pool:
        loaded = adapter if isinstance(adapter, Adapter) else load(adapter, base=merged)
        return _unmerge(merged, loaded, label, out, device, dtype, WriteOptions(force, direct, fsync, progress), pool)


def _unmerge(merged, loaded, label, out, device, dtype, options, pool) -> MergeResult:  # type: ignore[no-untyped-def]
    dora = sorted(n for n, m in loaded.modules.items() if m.magnitude is not None)
    if dora:
        raise MergeError(
            f"cannot unmerge DoRA modules ({', '.join(dora[:3])}{', ...' if len(dora) > 3 else ''}): "
            "a DoRA merge replaces each row norm of W + ΔW by the magnitude vector, so W is lost",
            path=label,
        )
    saved = sorted(k for k in loaded.extra_tensors if ".base_layer." not in k)
    if saved:
        raise MergeError(
            f"cannot unmerge modules_to_save tensors ({', '.join(saved[:3])}): the merge replaced the base tensors", path=label
        )
    loaded = Adapter(loaded.modules, loaded.config, {}, loaded.metadata)  # saved base_layer tensors are the base's own
    return _merge(merged, [loaded], [label], [-1.0], out, device, dtype, options, pool)


def _merge(base, adapters, labels, weights, out, device, dtype, options, pool) -> MergeResult:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    base = Path(base).resolve()  # "." has no name to build <base>-merged from
    if not adapters:
        raise MergeError("no adapters given")
    weights = check_weights(weights, len(adapters))
    if dtype not in DTYPE_CHOICES:
        raise MergeError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    checkpoint = open_checkpoint(base)
    out = Path(out) if out is not None else default_out(base)
    _check_out(base, out, options.force)
    target = resolve_device(device)
    edits = plan_edits(checkpoint, adapters, weights, labels)
    plans = [_file_plan(checkpoint.headers[s.name], edits, DTYPE_CHOICES[dtype], target, pool) for s in checkpoint.shards]
    total = write_checkpoint(checkpoint, plans, out, options, pin=target.type == "cuda")
    return MergeResult(
        out,
        base,
        labels,
        weights,
        target.type,
        dtype,
        len(plans),
        len(checkpoint.tensors),
        sorted(k for k, e in edits.items() if e.terms),
        sorted(k for k, e in edits.items() if e.replacement is not None),
        total,
        time.perf_counter() - start,
    )


@contextmanager
def _own_threads() -> Iterator[ThreadPoolExecutor]:
    """Single-threaded torch ops, with our own pool to run independent CPU row blocks in parallel.

    torch's intra-op threads spin-wait between the many small ops of a streamed merge (and of
    adapter validation); on a busy 2-core machine that made them up to 40x slower.  Independent
    blocks on a thread pool do not wait for each other.  torch's setting is restored on exit.
    Python's cyclic GC is paused too: the streaming loop makes no cycles, yet the allocations of
    thousands of row blocks set off collections that walk every object torch's import made
    (measured: 11% of a 1.8 GiB merge's CPU time).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    collecting = gc.isenabled()
    gc.disable()
    try:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=max(1, min(threads, cpus))) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


def _file_plan(header: Any, edits: dict[str, Edit], dtype: str | None, device: torch.device, pool: ThreadPoolExecutor) -> FilePlan:
    def out_dtype(info: TensorInfo) -> str:
        return dtype if dtype is not None and info.dtype in _FLOATS else info.dtype

    dtypes = {name: out_dtype(info) for name, info in header.tensors.items()}
    transforms = {name: edits[name].transform(device, pool) for name in header.tensors if name in edits}
    return FilePlan(header, dtypes, transforms)


def _check_out(base: Path, out: Path, force: bool) -> None:
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise MergeError("the output may not be the base or lie inside it (the base is never modified); choose another -o", path=out)
    if o in b.parents:
        raise MergeError("the output may not contain the base: replacing it would delete the base; choose another -o", path=out)
    check_output(out, force=force)


def plan_edits(checkpoint: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], labels: Sequence[str]) -> dict[str, Edit]:
    """Every base tensor the adapters change and how; raises before anything is written.

    :class:`ShapeError` lists every module (of every adapter) with no base tensor, a shape
    mismatch, or a ``lora_bias`` with no base bias; :class:`MergeError` lists DoRA conflicts.
    """
    tensors = checkpoint.tensors
    index = module_index(list(tensors))
    terms: dict[str, list[Term]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for adapter, weight, label in zip(adapters, weights, labels, strict=True):
        for name, module in adapter.modules.items():
            where = f"{label}: {spec.PREFIX}{name}"
            key = find_weight(name, index)
            if key is None:
                problems.append(f"{where}: no base tensor matches (looked for {name}.weight, with and without prefixes)")
                continue
            want, info = module.delta_shape(fan_in_fan_out=adapter.fan_in_fan_out), tensors[key]
            if info.shape != want or info.dtype not in _FLOATS:
                problems.append(f"{where}: ΔW is {list(want)} but base tensor {key} is {info.dtype} {list(info.shape)}")
                continue
            scale = weight * module.scale
            B, A = flat(module.B.float(), module.A.float())
            transposed = module.transposed(fan_in_fan_out=adapter.fan_in_fan_out)
            rounded = module.kind == "embedding" and module.magnitude is None
            terms.setdefault(key, []).append(Term(B, A, scale, transposed, rounded))
            if module.magnitude is not None:
                magnitudes[key] = module.magnitude.reshape(-1).float()
            if module.bias is not None:
                bias_key = key.removesuffix("weight") + "bias"
                if bias_key not in tensors or tensors[bias_key].shape != tuple(module.bias.shape):
                    problems.append(f"{where}: has lora_B.bias {list(module.bias.shape)} but base has no matching {bias_key}")
                    continue
                terms.setdefault(bias_key, []).append(Term(module.bias.float().reshape(-1, 1), torch.ones(1, 1), scale))
        for key, tensor in adapter.extra_tensors.items():
            target = _replaced_key(key, tensors, index)
            if target is None or tensors[target].shape != tuple(tensor.shape):
                what = f"base tensor {target} is {list(tensors[target].shape)}" if target else "no base tensor matches"
                problems.append(f"{label}: {key}: saved tensor {list(tensor.shape)} would replace a base tensor, but {what}")
                continue
            replacements[target] = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
    if problems:
        raise ShapeError(
            f"{len(problems)} adapter module(s) do not fit the base; nothing was written: "
            + "; ".join(problems[:_LISTED])
            + (
                f"; ... and {len(problems) - _LISTED} more (`loratools validate ADAPTER --base BASE` lists all)"
                if len(problems) > _LISTED
                else ""
            ),
            path=checkpoint.root,
        )
    shared = sorted(k for k in magnitudes if len(terms[k]) > 1)
    if shared:
        raise MergeError(
            f"DoRA modules share base tensors with other adapters ({', '.join(shared)}); "
            "DoRA renormalises the whole row, so the result would depend on merge order: merge them one at a time"
        )
    keys = terms.keys() | replacements.keys()
    return {k: Edit(k, tuple(terms.get(k, ())), magnitudes.get(k), replacements.get(k)) for k in keys}


def _replaced_key(key: str, tensors: dict[str, TensorInfo], index: dict[str, str]) -> str | None:
    """The base tensor a saved full tensor replaces: ``base_model.model.lm_head.weight`` -> ``lm_head.weight``."""
    name = key.removeprefix(spec.PREFIX).replace(".base_layer.", ".")
    if name in tensors:
        return name
    module, _, param = name.rpartition(".")
    weight = find_weight(module, index)
    candidate = weight.removesuffix("weight") + param if weight is not None else None
    return candidate if candidate in tensors else None
