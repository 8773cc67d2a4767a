"""The merge arithmetic, one base tensor at a time, in float32 row blocks.

The math is PEFT's ``merge_and_unload``, per base tensor W (shapes as the checkpoint stores them):

* LoRA: W' = W + Σᵢ wᵢ·sᵢ·BᵢAᵢ, s = alpha/r (alpha/√r with rsLoRA, per module after rank/alpha
  patterns), wᵢ the weight given to adapter i (it multiplies s, as PEFT's ``scale_layer`` does).
  ΔW is stored transposed, (BA)ᵀ, for ``fan_in_fan_out`` layers (GPT-2 Conv1D) and embeddings; conv
  factors are flattened, ΔW[o] = B[o]·A, whatever the kernel size.
  PEFT rounds an embedding's ΔW to the stored dtype before adding it, and a ``target_parameters``
  ΔW (fused MoE experts, routers; ParamWrapper.merge); so do we, to stay bit-identical.  A fused
  expert parameter's ΔW[e] = s·B[e]·A[e] lands on the fused base tensor (:class:`ExpertRowTerm`) or
  on the slice of each per-expert weight it was fused from (see :mod:`loratools.io.layouts`).
* ``lora_bias``: the base bias gains Σᵢ wᵢ·sᵢ·b_i.
* DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output feature: per row of linear and conv
  weights, per column of ``fan_in_fan_out`` weights and of embeddings (PEFT's conventions); for
  kohya/LyCORIS in-axis magnitudes (``wd_on_output=False``) per input feature, plus LyCORIS's ε
  (:func:`_in_axis_dora`).  An adapter weight w multiplies s inside the normalisation for
  per-output magnitudes, as PEFT's scale does; for per-input ones, which have no PEFT form, it
  interpolates W + w·(W' − W) with W' formed at full scale, as ComfyUI applies a strength
  (``comfy/weight_adapter/base.py`` ``weight_decompose``, v0.3.77; LyCORIS's own multiplier
  differs for w ≠ 1, all agree at w = 1).
* ``modules_to_save`` and saved ``*.base_layer.weight`` tensors replace the base tensor (LoRA terms on
  the same tensor then apply on top of the replacement, as in PEFT); trainable tokens replace rows
  (PEFT's ``index_copy``).  A replacement with more rows than the base (a grown vocabulary) gives
  every output row.

With a merge method other than the exact sum (:mod:`loratools.methods`: TIES, DARE, DELLA, ...),
each adapter's whole ΔWᵢ for the tensor is formed first (the sum of its terms there, unweighted:
s·B·A; row blocks on the pool, into buffers reused from tensor to tensor), and the method's
``select`` sees each whole ΔWᵢ once (trimming ranks magnitudes over the whole tensor; random
drops are drawn for the whole tensor); its entrywise ``join`` then runs per row block on the pool
and the block is added to W, so row-block streaming cannot change the result.  Memory: one float32
ΔWᵢ per adapter of the largest tensor, plus a random method's draws.  PEFT's rounding of embedding
and ``target_parameters`` ΔW does not apply there.

Everything is computed in float32 from the stored values and rounded once to the output dtype.
PEFT does the same, in the same order, when its adapter weights are float32 (its default: adapters
are upcast on load), so bf16 and fp16 merges are bit-identical to PEFT's (measured for plain, DoRA,
embedding and lora_bias adapters on sharded bases; tests/merging/test_run.py asserts it) and fp32
merges agree to within 1e-6.  Adapters in one call are summed in order into one float32
accumulator, which equals merging them one after another in float32 and rounding once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import cast

import torch

from ..adapter import MagnitudeAxis
from ..errors import SpecError
from ..io.streaming import Transform
from ..linalg import flat
from ..methods import (
    JoinPlan,
    Kept,
    Method,
    MethodOptions,
    join_plan,
    join_rows,
    module_generator,
    sample_rows,
    select_top_rows,
    selects_by_magnitude,
)
from ..planner import Residual, TensorEdit
from ..scratch import buffer

BLOCK = 1 << 19  # float32 elements per CPU row block: a few MiB, so temporaries stay in cache
_EPS = torch.finfo(torch.float32).eps  # LyCORIS's ε in the in-axis DoRA norm
_deltas = threading.local()  # the streaming thread's buffers for a merge method's whole ΔWᵢ (see _workspace)


@dataclass(frozen=True)
class RowTerm:
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

    def to(self, device: torch.device) -> RowTerm:
        return replace(self, B=self.B.to(device), A=self.A.to(device))


@dataclass(frozen=True)
class ExpertRowTerm(RowTerm):
    """``scale·B[e]·A[e]`` for a fused 3-D expert tensor (E, d1, d2), streamed as E rows of d1·d2.

    B (E, out, r), A (E, r, in); ``swapped``: the base stores ΔW[e]ᵀ (gpt-oss).  ``transposed``
    stays False: it speaks of the stored 2-D view, where row e is expert e either way.
    """

    swapped: bool = False

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        delta = torch.bmm(self.B[r0:r1], self.A[r0:r1])
        return (delta.transpose(1, 2) if self.swapped else delta).reshape(r1 - r0, -1).mul_(self.scale)


@dataclass(frozen=True)
class Combination:
    """A merge method over one tensor's terms: term j belongs to adapter ``owners[j]`` of weight ``weights[j]``.

    The terms then carry sᵢ only (no weight), because methods such as TIES elect signs on the
    unweighted ΔWᵢ and apply the weights in the mean.  ``stream``: the name a random method's
    drops are seeded by (:func:`~loratools.methods.module_generator`): the adapter module's name
    when one module edits the tensor, as ``add`` seeds it, so the same seed drops the same entries
    in both; the tensor key when several do (a fused tensor, which ``add`` never forms).
    """

    method: Method
    options: MethodOptions
    owners: tuple[int, ...]
    weights: tuple[float, ...]
    stream: str = ""

    @property
    def inputs(self) -> list[int]:
        return sorted(set(self.owners))

    @property
    def input_weights(self) -> tuple[float, ...]:
        first: dict[int, float] = {}
        for owner, w in zip(self.owners, self.weights, strict=True):
            first.setdefault(owner, w)
        return tuple(first[i] for i in self.inputs)

    def term(self, terms: tuple[RowTerm, ...], shape: tuple[int, int], key: str, device: torch.device, pool: Executor | None) -> RowTerm:
        """The method's term for the whole tensor: what each adapter keeps of its ΔWᵢ (the sum of its terms, s·B·A,
        stored layout, float32), and how row blocks join.

        On the CPU, for methods that keep by magnitude (TIES, magnitude pruning) on plain terms,
        ΔWᵢ is never formed whole: the threshold pass and the join compute its row blocks from the
        factors (:class:`StreamedTerm`), which reads no ΔWᵢ back from memory.  Otherwise each ΔWᵢ
        is formed in row blocks on ``pool`` (:class:`MethodTerm`) and each input selects on it
        (DARE's drops seeded by (seed, ``stream``), else ``key``).

        Random and row-wise methods select on ΔWᵢ in factor orientation (B·A, as ``add`` forms it)
        even where the base stores (B·A)ᵀ, so drops and row ranks follow the module, not the layout."""
        rows, cols = shape
        if device.type == "cpu" and selects_by_magnitude(self.method) and all(type(t) is RowTerm and not t.transposed for t in terms):
            streamed = self._streamed(terms, shape, pool)
            if streamed is not None:
                return streamed
        deltas = _workspace(len(self.inputs), rows * cols, device)
        slot = {owner: i for i, owner in enumerate(self.inputs)}
        step = rows if device.type != "cpu" else max(1, BLOCK // max(1, cols))

        def block(r0: int) -> None:
            r1 = min(rows, r0 + step)
            filled: set[int] = set()
            for term, owner in zip(terms, self.owners, strict=True):
                flat_target = deltas[slot[owner]][r0 * cols : r1 * cols]
                if owner not in filled and type(term) is RowTerm and not term.transposed:
                    term.rows(r0, r1, flat_target)  # B·A straight into the buffer, then ·s in place: no copy
                    filled.add(owner)
                    continue
                target = flat_target.view(r1 - r0, cols)
                part = term.rows(r0, r1)
                if owner in filled:
                    target.add_(part)
                else:
                    target.copy_(part)
                    filled.add(owner)

        _run(block, range(0, rows, step), pool if device.type == "cpu" else None)
        dense = tuple(d[: rows * cols].view(rows, cols) for d in deltas)
        generator = module_generator(self.options.seed, self.stream or key, device) if self.method.random else None
        workers = pool if device.type == "cpu" else None
        flip = (self.method.rowwise or self.method.random) and any(t.transposed for t in terms)  # B·A, not the stored (B·A)ᵀ

        def select(d: torch.Tensor, inner: Executor | None) -> Kept:
            kept = self.method.select(d.T if flip else d, self.options, generator, inner)
            return kept.transposed() if flip else kept

        if generator is None and workers is not None and len(dense) > 1:  # inputs side by side, each on one worker
            kept = tuple(workers.map(lambda d: select(d, None), dense))
        else:  # in input order: a random method's one stream
            kept = tuple(select(d, workers) for d in dense)
        empty = torch.empty(0)
        return MethodTerm(empty, empty, 1.0, deltas=dense, kept=kept, combination=self)

    def _streamed(self, terms: tuple[RowTerm, ...], shape: tuple[int, int], pool: Executor | None) -> StreamedTerm | None:
        """Each input's :class:`Kept` from row blocks computed and dropped (:func:`~loratools.methods.select_top_rows`),
        bracketed by a sample of ΔWᵢ taken from the factors; None when a small tensor or a missed bracket needs the whole ΔWᵢ."""
        rows, cols = shape
        owned = tuple(tuple(t for t, o in zip(terms, self.owners, strict=True) if o == owner) for owner in self.inputs)
        side_by_side = pool is not None and len(owned) > 1  # each input's whole pass on one worker, serial steps included

        def select(parts: tuple[RowTerm, ...]) -> Kept | None:
            def block(r0: int, r1: int) -> tuple[torch.Tensor, float]:
                return _input_rows(parts, r0, r1, buffer("methods-select", (r1 - r0) * cols).view(r1 - r0, cols))

            sample = sample_rows(tuple((t.B, t.A, t.scale) for t in parts), shape).abs_()
            return select_top_rows(block, shape, self.options.density, sample, None if side_by_side else pool)

        kept = list(pool.map(select, owned)) if side_by_side else [select(parts) for parts in owned]  # type: ignore[union-attr]
        if any(k is None for k in kept):
            return None
        empty = torch.empty(0)
        chosen = tuple(k for k in kept if k is not None)
        plan = join_plan(self.method, self.options, chosen, self.input_weights, torch.float32)
        return StreamedTerm(empty, empty, 1.0, inputs=owned, kept=chosen, combination=self, plan=plan)


def _input_rows(parts: tuple[RowTerm, ...], r0: int, r1: int, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rows ``r0:r1`` of one input's ΔWᵢ into ``target`` as (P, s), ΔWᵢ = P·s in float32: one term's B·A and its s
    (the kernels multiply as they read), or the first term's (B·A)·s plus each further term, as
    :meth:`Combination.term` forms ΔWᵢ, and 1."""
    if len(parts) == 1:
        B, A = parts[0].B[r0:r1], parts[0].A
        return torch.mm(B, A, out=target.view(B.shape[0], A.shape[1])), parts[0].scale
    parts[0].rows(r0, r1, target.view(-1))
    for part in parts[1:]:
        target.add_(part.rows(r0, r1))
    return target, 1.0


@dataclass(frozen=True)
class StreamedTerm(RowTerm):
    """A magnitude method's ΔW, joined row block by row block from each input's rows recomputed from its factors."""

    inputs: tuple[tuple[RowTerm, ...], ...] = ()
    kept: tuple[Kept, ...] = ()
    combination: Combination | None = None
    plan: JoinPlan | None = None  # the fused join's per-input constants, worked out once

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        c = cast(Combination, self.combination)  # always set: Combination.term builds these
        cols = self.inputs[0][0].A.shape[1]
        n = (r1 - r0) * cols
        blocks = buffer("methods-rows", len(self.inputs) * n).view(len(self.inputs), r1 - r0, cols)
        scales = [_input_rows(parts, r0, r1, target)[1] for parts, target in zip(self.inputs, blocks, strict=True)]
        return join_rows(c.method, c.options, self.kept, blocks, r0, c.input_weights, buffer("methods-joined", n), scales, self.plan)


@dataclass(frozen=True)
class MethodTerm(RowTerm):
    """A merge method's ΔW, joined row block by row block from the inputs' whole ΔWᵢ and what each keeps."""

    deltas: tuple[torch.Tensor, ...] = ()
    kept: tuple[Kept, ...] = ()
    combination: Combination | None = None

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        c = cast(Combination, self.combination)  # always set: Combination.term builds these
        blocks = torch.stack([d[r0:r1] for d in self.deltas]) if len(self.deltas) > 1 else self.deltas[0][r0:r1].unsqueeze(0)
        return join_rows(c.method, c.options, self.kept, blocks, r0, c.input_weights)


def _run(fn: Callable[[int], None], items: range, pool: Executor | None) -> None:
    if pool is None:
        for x in items:
            fn(x)
    else:
        list(pool.map(fn, items))


def _workspace(count: int, numel: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` flat float32 buffers of at least ``numel`` elements, reused from tensor to tensor on the CPU.

    A streamed merge transforms one tensor at a time on one thread, so the buffers of one tensor's
    ΔWᵢ can serve the next: fresh 50 MB allocations would fault in every page (~10 ms each).
    """
    if device.type != "cpu":
        return [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(count)]
    buffers: list[torch.Tensor] = getattr(_deltas, "buffers", [])
    buffers = [b if b.numel() >= numel else torch.empty(numel, dtype=torch.float32) for b in buffers[:count]]
    buffers += [torch.empty(numel, dtype=torch.float32) for _ in range(count - len(buffers))]
    _deltas.buffers = buffers
    return buffers


@dataclass(frozen=True)
class Kernel:
    """One base tensor's planned edit in float32 on its device: the row-block merge step of :func:`loratools.merge`."""

    key: str
    terms: tuple[RowTerm, ...] = ()
    magnitude: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None  # long (k,): rows replaced by token_values (k, cols) float32
    token_values: torch.Tensor | None = None
    residual: Residual | None = None  # taken from the whole base tensor before the rows are merged
    combination: Combination | None = None
    magnitude_axis: MagnitudeAxis = "out"  # DoRA's: per output feature (PEFT) or per input feature (LyCORIS wd_on_output=False)
    dora_weight: float = 1.0  # an in-axis DoRA's adapter weight w: W + w·(W' − W), W' formed at full scale (ComfyUI's strength)

    @property
    def trivial(self) -> bool:
        """Nothing changes: the output is the source tensor's bytes (an untied head copied from the embedding)."""
        return not self.terms and self.magnitude is None and self.replacement is None and self.token_rows is None

    @property
    def norm_cols(self) -> bool:
        """DoRA's norms run down the stored tensor's columns, so the tensor is one block: per output feature
        when ΔW is transposed, per input feature (a column, or a conv's column group) when it is not."""
        return any(t.transposed for t in self.terms) != (self.magnitude is not None and self.magnitude_axis == "in")

    def to(self, device: torch.device) -> Kernel:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Kernel(
            self.key,
            tuple(t.to(device) for t in self.terms),
            move(self.magnitude),
            move(self.replacement),
            move(self.token_rows),
            move(self.token_values),
            self.residual,
            self.combination,
            self.magnitude_axis,
            self.dora_weight,
        )

    def low_rank(self, r0: int, r1: int) -> tuple[tuple[torch.Tensor, torch.Tensor, float], ...] | None:
        """Rows ``r0:r1`` of this edit as (B rows, A, s) terms when it only adds plain LoRA products (:meth:`rows`
        then adds (B·A)·s for each, in order), else None; for codecs that fuse the sum into their decode."""
        plain = all(type(t) is RowTerm and not t.transposed and not t.rounded for t in self.terms)
        if not plain or self.magnitude is not None or self.replacement is not None or self.token_rows is not None:
            return None
        return tuple((t.B[r0:r1], t.A, t.scale) for t in self.terms)

    def rows(self, src: torch.Tensor, r0: int, r1: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Merged rows ``r0:r1`` in float32, from base rows ``src`` (any float dtype).

        ``scratch``: optional flat float32 buffer of at least 2·``src.numel()`` elements to work in.
        """
        shape = (r1 - r0, src.shape[1])
        n = shape[0] * shape[1]
        x = scratch[:n].view(shape) if scratch is not None else torch.empty(shape, dtype=torch.float32, device=src.device)
        work = scratch[n : 2 * n] if scratch is not None else None
        x.copy_(self.replacement[r0:r1] if self.replacement is not None else src)
        if self.token_rows is not None and self.token_values is not None:
            inside = (self.token_rows >= r0) & (self.token_rows < r1)
            x.index_copy_(0, self.token_rows[inside] - r0, self.token_values[inside])
        before = x.clone() if self.magnitude is not None and self.dora_weight != 1.0 else None
        for term in self.terms:
            delta = term.rows(r0, r1, work)
            x.add_(delta.to(src.dtype) if term.rounded else delta)
        if self.magnitude is not None and self.magnitude_axis == "in":
            _in_axis_dora(x, self.magnitude if self.norm_cols else self.magnitude[r0:r1], per_column=self.norm_cols)
            if before is not None:
                x.sub_(before).mul_(self.dora_weight).add_(before)
        elif self.magnitude is not None:
            norm = torch.linalg.norm(x, dim=0 if self.norm_cols else 1)
            magnitude = self.magnitude if self.norm_cols else self.magnitude[r0:r1]
            factor = magnitude / norm
            x.mul_(factor.view(1, -1) if self.norm_cols else factor.view(-1, 1))
        return x

    def transform(self, device: torch.device, pool: ThreadPoolExecutor | None = None) -> Transform:
        """The streaming step: fill the output rows from the input rows; on CPU, row blocks run on ``pool``."""
        moved = self.to(device)

        def run(src: torch.Tensor, dst: torch.Tensor) -> None:
            rows = dst.shape[0]
            edit = moved
            if edit.combination is not None:  # the method selects on each whole ΔWᵢ once; row blocks join slices of them
                term = edit.combination.term(edit.terms, (rows, dst.shape[1]), edit.key, device, pool)
                edit = replace(edit, terms=(term,), combination=None)
            if rows != src.shape[0]:  # a grown vocabulary: the replacement gives every row, src only its dtype
                src = src[:0]
            if edit.residual is not None:  # needs the whole tensor (an SVD or QR of it), then merges as usual
                src = residual_base(src.to(device), edit.residual)
            if device.type != "cpu":
                dst.copy_(edit.rows(src.to(device, non_blocking=True), 0, rows))  # waits for the GPU
                return
            step = rows if edit.norm_cols else max(1, BLOCK // max(1, src.shape[1]))

            def block(r0: int) -> None:
                r1 = min(rows, r0 + step)
                need = 2 * (r1 - r0) * src.shape[1]
                work = buffer("kernels", need, least=2 * BLOCK)
                dst[r0:r1].copy_(edit.rows(src[r0:r1] if src.shape[0] else src, r0, r1, work))

            if pool is None:
                for r0 in range(0, rows, step):
                    block(r0)
            else:
                list(pool.map(block, range(0, rows, step)))

        return run


def kernel(edit: TensorEdit, method: Method | None = None, options: MethodOptions | None = None) -> Kernel:
    """The float32 merge step for one planned edit: each term's factors flattened, weight·s folded into its scale.

    A bias term is B = b as a column and A = [[1]].  Non-DoRA embedding terms are rounded to the
    stored dtype before they are added, as PEFT does.  With a ``method`` other than task arithmetic
    the weights stay out of the terms and a :class:`Combination` combines them; DoRA and lora_bias
    terms are refused there (the methods are defined on a plain ΔW).
    """
    combining = method is not None and method.name != "task_arithmetic" and bool(edit.terms)
    if combining:
        _refuse_for_method(edit, method.name)  # type: ignore[union-attr]
    terms = []
    in_axis = edit.magnitude is not None and any(t.lora.magnitude_axis == "in" for t in edit.terms if t.lora.magnitude is not None)
    for t in edit.terms:
        scale = t.lora.scale if combining or in_axis else t.weight * t.lora.scale
        if t.bias is not None:
            terms.append(RowTerm(t.bias.float().reshape(-1, 1), torch.ones(1, 1), scale))
            continue
        rounded = (t.lora.kind == "embedding" and t.lora.magnitude is None) or t.rounded
        if t.lora.kind == "parameter":
            terms.append(ExpertRowTerm(t.lora.B.float(), t.lora.A.float(), scale, False, rounded, swapped=t.transposed))
            continue
        B, A = flat(t.lora.B.float(), t.lora.A.float())
        terms.append(RowTerm(B, A, scale, t.transposed, rounded))
    rows = values = None
    if edit.tokens is not None:
        rows = torch.tensor(edit.tokens.indices, dtype=torch.long)
        values = edit.tokens.values.float().reshape(len(edit.tokens.indices), -1)
    combination = None
    if combining:
        owners, weights = tuple(t.adapter for t in edit.terms), tuple(t.weight for t in edit.terms)
        modules = {t.module for t in edit.terms}
        stream = modules.pop() if len(modules) == 1 else edit.key
        combination = Combination(method, options or MethodOptions(), owners, weights, stream)  # type: ignore[arg-type]
    axis: MagnitudeAxis = "in" if in_axis else "out"
    weight = edit.terms[0].weight if in_axis else 1.0  # a DoRA tensor has no other term (planner: dora-shared-tensor)
    return Kernel(edit.key, tuple(terms), edit.magnitude, edit.replacement, rows, values, edit.residual, combination, axis, weight)


def _in_axis_dora(x: torch.Tensor, magnitude: torch.Tensor, *, per_column: bool) -> None:
    """DoRA along in_features, in place on merged rows ``x`` = W + ΔW: W' = W_c · m / (‖W_c‖_in + ε).

    lycoris-lora 4.1.3 ``functional/general.py`` ``_weight_decompose`` with ``wd_on_out=False``: the
    norm of each input feature's slice over every other axis (a column of a linear weight; for a conv,
    the in-channel's (out, kh, kw) slab, which the flat (out, in·kh·kw) rows hold as a column group),
    plus float32's ε as LyCORIS adds it.  ``per_column`` False: a transposed linear (fan_in_fan_out),
    whose stored rows are the input features.
    """
    if per_column:
        view = x.view(x.shape[0], magnitude.numel(), -1)
        norm = torch.linalg.vector_norm(view, dim=(0, 2)) + _EPS
        view.mul_((magnitude / norm).view(1, -1, 1))
    else:
        x.mul_((magnitude / (torch.linalg.norm(x, dim=1) + _EPS)).view(-1, 1))


def _refuse_for_method(edit: TensorEdit, name: str) -> None:
    if edit.magnitude is not None:
        raise SpecError(f"DoRA modules cannot be merged with method {name}: DoRA renormalises W + ΔW row by row", key=edit.key)
    biased = [t.module for t in edit.terms if t.bias is not None]
    if biased:
        raise SpecError(f"{biased[0]} has a lora_bias; method {name} is defined only for plain LoRA factors", key=edit.key)


def residual_base(W: torch.Tensor, residual: Residual) -> torch.Tensor:
    """The base weight PEFT builds when it loads a PiSSA/OLoRA adapter saved without conversion, in ``W``'s dtype.

    The same float32 operations in the same order as peft 0.21.2 tuners/lora/layer.py ``pissa_init``
    (an SVD of W, transposed under fan_in_fan_out; W − s·B₀A₀ with B₀ = V_r·√(S_r/s), A₀ = √(S_r/s)·U_rᵀ)
    and ``olora_init`` (a QR of W; W − s·Q_r·R_r), then rounded to the stored dtype as PEFT stores
    it, so the LoRA terms that follow are added to exactly the residual PEFT runs the adapter on.
    """
    w = W.to(torch.float32)
    k, s = residual.rank, residual.scale
    if residual.family == "pissa":
        w = w.T if residual.transposed else w
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[:k] / s
        A0 = torch.diag(torch.sqrt(Sr)) @ Uh[:k]
        B0 = V[:, :k] @ torch.diag(torch.sqrt(Sr))
        w = w - s * B0 @ A0
        w = w.T if residual.transposed else w
    else:
        Q, R = torch.linalg.qr(w)
        w = w - s * Q[:, :k].contiguous() @ R[:k].contiguous()
    return w.to(W.dtype).contiguous()
