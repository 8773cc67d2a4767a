"""Bake adapters into a base checkpoint (``merge``) or take one back out (``unmerge``), streaming.

The planner (:mod:`loratools.planner`) decides which base tensor each module changes and refuses
every misfit before anything is written; :mod:`.kernels` does the arithmetic, PEFT's
``merge_and_unload`` in float32; :mod:`loratools.io.streaming` writes the output tensor by tensor.

DoRA in a multi-adapter merge: a DoRA module's tensor may not be touched by any other adapter, since
its renormalisation would depend on merge order; DoRA modules on tensors no other adapter touches are
fine.  ``unmerge`` refuses DoRA outright: the merged weight keeps only the direction of W + ΔW (its
norms become m), so W cannot be recovered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import spec, variants
from ..adapter import Adapter, check_weights
from ..api import load
from ..compute import resolve_device, single_threaded
from ..errors import MergeError, ShapeError
from ..io.atomic import check_output
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.streaming import FilePlan, WriteOptions, write_checkpoint
from ..io.tensorfile import DtypeLike, Header, TensorInfo
from ..methods import MethodOptions, get_method, module_weights
from ..planner import CONFLICTS, FLOAT_DTYPES, VARIANTS, Plan, TensorEdit, plan
from . import quantized
from .kernels import Kernel, kernel

_LISTED = 8  # problems named in one error line; validate --base lists every one
AdapterLike = str | Path | Adapter


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
    warnings: list[str] = field(default_factory=list)  # the planner's warnings ("where: message"), e.g. an overridden fan_in_fan_out
    added: list[str] = field(default_factory=list)  # tensors the base does not store (an untied lm_head.weight)
    config: dict[str, Any] = field(default_factory=dict)  # config.json fields set (tie_word_embeddings, vocab_size)
    survival: dict[str, float] = field(default_factory=dict)  # requantized tensor -> fraction of ‖ΔW‖ kept
    survival_total: float | None = None  # over every requantized tensor; None when nothing was requantized
    quantization: dict[str, Any] = field(default_factory=dict)  # the base's (quantized.describe) and what became of it

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
            "warnings": self.warnings,
            "added": self.added,
            "config": self.config,
            "survival": {"total": self.survival_total, "tensors": self.survival},
            "quantization": self.quantization,
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
    device: spec.Device = "auto",
    dtype: DtypeLike = "keep",
    force: bool = False,
    direct: bool = True,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    method: str = "task_arithmetic",
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int = 0,
    weight_patterns: Sequence[tuple[str, float]] = (),
) -> MergeResult:
    """Write ``base`` with ``adapters`` baked in (W' = W + Σ wᵢ·ΔWᵢ) to ``out``; returns what was done.

    ``method`` (:mod:`loratools.methods`; ``density``, ``majority_sign``, ``seed`` as there) replaces
    the sum per base tensor, exactly (no SVD): W' = W + method(ΔW₁..ΔWₙ; w), each ΔWᵢ the whole
    tensor's, so results do not depend on how rows are streamed.  ``weight_patterns``: (regex, W)
    pairs multiplying every adapter's weight on the modules a regex finds first (:mod:`loratools.methods.weights`).

    ``base`` is a HF model directory (``model.safetensors`` or shards + index) or one ``.safetensors``
    file; ``out`` (default :func:`default_out`) mirrors it: same files, tensor order, dtypes (unless
    ``dtype``), index and side files, plus what the adapters need beyond the base: a tied
    ``lm_head.weight`` that no longer equals the embedding is written (``tie_word_embeddings: false``)
    and a vocabulary the adapter grows sets ``vocab_size`` (:mod:`loratools.fulltensors`).  Nothing
    is written unless every adapter module maps to a base tensor of its ΔW's shape
    (:class:`ShapeError` lists every one that does not).  The output appears
    only when complete (a crash, Ctrl-C, kill -9 or full disk leaves none); ``fsync`` also flushes
    it to stable storage first.  ``direct`` writes around the page cache where the file system
    allows (:mod:`loratools.sink` says why); ``progress`` is called with (bytes written, bytes total).
    """
    chosen = get_method(method)
    options = MethodOptions(1.0 if density is None else density, majority_sign or "total", seed)
    chosen.check(options, density_given=density is not None, sign_given=majority_sign is not None)
    with single_threaded(pause_gc=True) as pool:
        loaded = [a if isinstance(a, Adapter) else load(a, base=base) for a in adapters]  # base maps kohya names
        factors = module_weights(weight_patterns, list(dict.fromkeys(n for a in loaded for n in a.modules)))
        loaded = [a.reweighted(factors) for a in loaded] if factors else loaded
        labels = [str(a) if not isinstance(a, Adapter) else f"adapter #{i + 1}" for i, a in enumerate(adapters)]
        write = WriteOptions(force, direct, fsync, progress)
        return _merge(base, loaded, labels, weights, out, device, dtype, write, pool, (chosen, options))


def unmerge(
    merged: str | Path,
    adapter: AdapterLike,
    *,
    out: str | Path,
    device: spec.Device = "auto",
    dtype: DtypeLike = "keep",
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
    ``modules_to_save`` / trainable-token merges are refused: they replace what they touch, which cannot be undone.
    """
    label = str(adapter) if not isinstance(adapter, Adapter) else "adapter #1"
    with single_threaded(pause_gc=True) as pool:
        loaded = adapter if isinstance(adapter, Adapter) else load(adapter, base=merged)
        return _unmerge(merged, loaded, label, out, device, dtype, WriteOptions(force, direct, fsync, progress), pool)


def _unmerge(merged, loaded, label, out, device, dtype, options, pool) -> MergeResult:  # type: ignore[no-untyped-def]
    if variants.rebuilt_init(loaded.config):
        raise MergeError(
            f"cannot unmerge a {variants.rebuilt_init(loaded.config)} adapter: its merge took the top singular part of W "
            "out of the base, which the merged weights no longer tell",
            path=label,
        )
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


def _merge(base, adapters, labels, weights, out, device, dtype, options, pool, method=(None, None)) -> MergeResult:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    base = Path(base).resolve()  # "." has no name to build <base>-merged from
    if not adapters:
        raise MergeError("no adapters given")
    weights = check_weights(weights, len(adapters))
    code = spec.dtype_code(dtype)
    checkpoint = open_checkpoint(base)
    out = Path(out) if out is not None else default_out(base)
    _check_out(base, out, options.force)
    target = resolve_device(device)
    planned = _planned(checkpoint, adapters, weights, labels)
    edits = {key: kernel(edit, *method) for key, edit in planned.edits.items()}
    jobs = quantized.jobs(checkpoint, planned.quant, edits, code, pool)
    plans = [_file_plan(checkpoint.headers[s.name], planned.edits, edits, code, target, pool, jobs) for s in checkpoint.shards]
    dequantized = code is not None and bool(planned.quant.params or planned.quant.method)
    removed = ("quantization_config",) if dequantized else ()
    total = write_checkpoint(checkpoint, plans, out, options, pin=target.type == "cuda", config=planned.config, removed_config=removed)
    survival, survival_total = quantized.survival(jobs)
    quantization = {**quantized.describe(planned.quant), "written": "dequantized" if dequantized else "kept"} if planned.quant else {}
    return MergeResult(
        out,
        base,
        labels,
        weights,
        target.type,
        spec.dtype_choice(dtype),
        len(plans),
        len(checkpoint.tensors) + sum(len(p.added) for p in plans),
        sorted(k for k, e in edits.items() if e.terms),
        sorted(k for k, e in edits.items() if e.replacement is not None or e.token_rows is not None),
        total,
        time.perf_counter() - start,
        [f"{p.where}: {p.message}" for p in planned.problems if p.severity == "warning"]
        + quantized.survival_warnings(survival, survival_total),
        sorted(name for p in plans for name in p.added),
        dict(planned.config),
        survival,
        survival_total,
        quantization,
    )


def _file_plan(
    header: Header,
    planned: dict[str, TensorEdit],
    edits: dict[str, Kernel],
    dtype: str | None,
    device: torch.device,
    pool: ThreadPoolExecutor,
    jobs: dict[str, quantized.QuantJob],
) -> FilePlan:
    """One shard's plan: its own tensors, plus each planned tensor the base does not store (an untied head)
    appended to the shard that holds its source; quantized parameters through their codecs' jobs."""

    def out_dtype(info: TensorInfo) -> str:
        return dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype

    added = {k: e.source for k, e in planned.items() if k not in header.tensors and e.source is not None and e.source in header.tensors}
    names = {**{n: n for n in header.tensors}, **added}
    dtypes = {name: out_dtype(header.tensors[src]) for name, src in names.items()}
    transforms = {name: edits[name].transform(device, pool) for name in names if name in edits and not edits[name].trivial}
    shapes = {name: e.shape for name, e in planned.items() if name in names and e.shape is not None}
    quant = quantized.shard_parts(header, jobs, dtype)
    for name in quant.renamed:
        dtypes.pop(name, None)
    dtypes = {n: d for n, d in dtypes.items() if n not in quant.dropped} | quant.dtypes
    transforms = {**transforms, **quant.transforms}
    shapes = {**shapes, **quant.shapes}
    return FilePlan(header, dtypes, transforms, shapes, added, quant.dropped, quant.renamed, quant.after)


def _check_out(base: Path, out: Path, force: bool) -> None:
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise MergeError("the output may not be the base or lie inside it (the base is never modified); choose another -o", path=out)
    if o in b.parents:
        raise MergeError("the output may not contain the base: replacing it would delete the base; choose another -o", path=out)
    check_output(out, force=force)


def _planned(checkpoint: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], labels: Sequence[str]) -> Plan:
    """The planner's plan; raises before anything is written if it found any error (warnings pass).

    :class:`ShapeError` lists every module (of every adapter) that does not fit the base;
    :class:`MergeError` combinations with no exact result (DoRA sharing a tensor, different full copies
    of one tensor, a weight on a full tensor, overlapping token rows).
    """
    result = plan(checkpoint, adapters, weights=weights, labels=labels)
    if result.ok:
        return result
    errors = result.errors
    problems = [f"{p.where}: {p.message}" for p in errors]
    listed = "; ".join(problems[:_LISTED])
    if len(problems) > _LISTED:
        listed += f"; ... and {len(problems) - _LISTED} more (`loratools validate ADAPTER --base BASE` lists all)"
    if all(p.code in VARIANTS for p in errors):
        raise MergeError(f"no exact merge exists; nothing was written: {listed}", path=checkpoint.root)
    if all(p.code in CONFLICTS for p in errors):
        raise MergeError(f"{len(problems)} combination(s) with no exact result; nothing was written: {listed}", path=checkpoint.root)
    raise ShapeError(f"{len(problems)} adapter module(s) do not fit the base; nothing was written: {listed}", path=checkpoint.root)
