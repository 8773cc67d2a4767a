"""A merge method over one base tensor's terms: select once per whole tensor, join per row block.

Methods other than the exact sum (:mod:`loratools.methods`: TIES, DARE, DELLA, ...) see each
adapter's ΔWᵢ for the tensor (the sum of its terms there, unweighted: s·B·A) once, whole:
trimming ranks magnitudes over the whole tensor, random drops are drawn for the whole tensor.
Their entrywise ``join`` then runs per row block on the pool, so blocks cannot change the result.

* TIES and magnitude pruning on the CPU, plain terms (:class:`StreamedTerm`): ΔWᵢ is never formed
  whole.  Each input's exact threshold comes from row blocks computed from the factors, scanned and
  dropped, bracketed by a sample of ΔWᵢ taken from the factors
  (:func:`~loratools.methods.select_top_rows`); the join computes each block's B·A again and
  joins them in one compiled pass (:func:`~loratools.methods.join_rows`).  Memory: a few row
  blocks per worker.
* Everything else (:class:`MethodTerm`): each ΔWᵢ is formed in row blocks on the pool into
  buffers reused from tensor to tensor, each input selects on it, and row blocks join slices of
  them.  Memory: one float32 ΔWᵢ per adapter of the largest tensor, plus a random method's draws.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import cast

import torch

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
from ..scratch import buffer
from .terms import BLOCK, RowTerm

_deltas = threading.local()  # the streaming thread's buffers for a merge method's whole ΔWᵢ (see _workspace)


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
        plan = join_plan(self.method, self.options, kept, self.input_weights, torch.float32) if device.type == "cpu" else None
        return MethodTerm(empty, empty, 1.0, deltas=dense, kept=kept, combination=self, plan=plan)

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
        return join_rows(c.method, c.options, self.kept, blocks, r0, c.input_weights, self.plan, buffer("methods-joined", n), scales)


@dataclass(frozen=True)
class MethodTerm(RowTerm):
    """A merge method's ΔW, joined row block by row block from the inputs' whole ΔWᵢ and what each keeps."""

    deltas: tuple[torch.Tensor, ...] = ()
    kept: tuple[Kept, ...] = ()
    combination: Combination | None = None
    plan: JoinPlan | None = None  # the fused join's per-input constants (join_plan); None: the torch steps on the slices

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        c = cast(Combination, self.combination)  # always set: Combination.term builds these
        return join_rows(c.method, c.options, self.kept, [d[r0:r1] for d in self.deltas], r0, c.input_weights, self.plan)


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
