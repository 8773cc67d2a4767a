"""The merge-method interface and the steps methods share: trim, drop, elect sign, disjoint mean.

Each step's definition follows PEFT 0.21 (``peft/utils/merge_utils.py``), the peer whose
``add_weighted_adapter`` results tests compare against: density is the kept fraction of entries of
each ΔWᵢ, k = ⌊density·numel⌋ by magnitude over the whole tensor; the sign is elected on the
trimmed, *unweighted* ΔWᵢ; the disjoint mean divides the weighted sum of agreeing entries by how
many inputs agree (at least 1).

A method runs in two steps so that a streamed merge can work in cache-sized row blocks on every
core: ``select`` sees one input's whole ΔWᵢ (trimming ranks magnitudes over the whole tensor;
random drops are drawn for the whole tensor, so a seed's result never depends on blocking) and
returns a :class:`Kept`, what that input keeps; ``join`` is entrywise, so it runs on any row block
of the kept inputs.  :meth:`Method.combine` is both steps on whole tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ArgumentError
from ..scratch import buffer
from ..spec import MAJORITY_SIGN_CHOICES

MAJORITY_SIGNS = MAJORITY_SIGN_CHOICES

DEFAULT_EPSILON = 0.15  # DELLA's window half-width when none is given: mergekit 0.1.5's default (generalized_task_arithmetic.py)
_CHUNK = 1 << 19  # elements per piece of a whole-tensor pass: a few MiB, so temporaries stay in cache


@dataclass(frozen=True)
class MethodOptions:
    """A method's knobs: kept fraction ``density`` in (0, 1], sign election rule, seed of random drops, DELLA's ``epsilon``."""

    density: float = 1.0
    majority_sign: str = "total"
    seed: int = 0
    epsilon: float = 0.0


@dataclass(frozen=True)
class Kept:
    """What one input keeps of its ΔW, decided over the whole tensor and applied to any row block.

    ``threshold``: keep entries with |x| >= it (exactly k entries reach it); ``strict``: keep those
    with |x| > it, and of the entries equal to it those at flat (row-major) indices below ``cut``;
    ``mask``: keep where 1 (float 0/1, whole tensor); none of them: keep all; ``nothing``: keep
    none.  Kept entries are divided by ``divisor`` (DARE's p, a whole tensor for DELLA's per-entry
    keep probabilities) when given.
    """

    threshold: torch.Tensor | None = None
    strict: bool = False
    cut: int = 0
    mask: torch.Tensor | None = None
    divisor: float | torch.Tensor | None = None
    nothing: bool = False

    def apply(self, block: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the kept ΔW, from the same rows ``block`` of the input's ΔW: x·keep (then / divisor).

        Masks are float 0/1 and multiply, as PEFT's ``random_pruning`` does; float-valued
        comparisons are also ~5x faster than bool-valued ones on CPU.  A threshold is one
        ``hardshrink`` pass (x where |x| > λ, else +0; λ = the float below the threshold for
        |x| >= it), 4x cheaper than |x|, compare, multiply; its dropped entries are +0 where PEFT's
        ``magnitude_based_pruning`` multiplies a negative one to -0.0, which no join can tell
        apart: every sum starts from +0 and agreement needs a nonzero entry.
        """
        if self.nothing:
            return torch.zeros_like(block)
        if self.mask is not None:
            kept = block * self.mask[r0:r1]
        elif self.threshold is not None:
            t = float(self.threshold)
            below = float(torch.nextafter(self.threshold.to(block.dtype), torch.tensor(-math.inf, dtype=block.dtype)))
            start = self.cut - r0 * (block.numel() // max(1, r1 - r0)) if self.strict else block.numel()
            if start <= 0:
                kept = torch.hardshrink(block, t)
            elif start >= block.numel():
                kept = torch.hardshrink(block, below)
            else:  # the tied entries before the cut are kept, those after it dropped
                flat, kept = block.reshape(-1), torch.empty_like(block)
                torch.hardshrink(flat[:start], below, out=kept.view(-1)[:start])
                torch.hardshrink(flat[start:], t, out=kept.view(-1)[start:])
        else:
            return block
        divisor = self.divisor[r0:r1] if isinstance(self.divisor, torch.Tensor) else self.divisor
        return kept if divisor is None else kept.div_(divisor)

    def transposed(self) -> Kept:
        """The same selection of the transposed ΔW (2-D): what a merge streams for fan_in_fan_out layers and embeddings.

        Only for mask and divisor selections (random and row-wise methods): a ``cut`` counts row-major indices.
        """
        divisor = self.divisor.T if isinstance(self.divisor, torch.Tensor) else self.divisor
        return replace(self, mask=None if self.mask is None else self.mask.T, divisor=divisor)


# select(delta, options, generator, pool) -> Kept, on one input's whole ΔW (float32 or float64)
Select = Callable[[torch.Tensor, "MethodOptions", "torch.Generator | None", "Executor | None"], Kept]
# join(kept blocks, weights, options) -> ΔW block, entrywise
Join = Callable[[Sequence[torch.Tensor], Sequence[float], "MethodOptions"], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One merge method: its name, its two steps, which options it reads, and where it comes from."""

    name: str
    select: Select
    join: Join
    uses_density: bool
    uses_sign: bool
    random: bool
    paper: str
    uses_epsilon: bool = False
    rowwise: bool = False  # select ranks within rows of B·A (DELLA): a merge gives it ΔWᵢ in that orientation

    def combine(
        self,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        options: MethodOptions,
        generator: torch.Generator | None = None,
        pool: Executor | None = None,
    ) -> torch.Tensor:
        """The combined ΔW of whole tensors: each input's :class:`Kept` (in input order: one generator stream), then ``join``."""
        kept = [self.select(d, options, generator, pool) for d in deltas]
        return join_rows(self, options, kept, deltas, 0, weights, plan=None)

    def options(
        self, *, density: float | None = None, majority_sign: str | None = None, seed: int = 0, epsilon: float | None = None
    ) -> MethodOptions:
        """The options a user gave (None: not given), checked (:meth:`check`), with this method's defaults filled in."""
        eps = (DEFAULT_EPSILON if self.uses_epsilon else 0.0) if epsilon is None else epsilon
        options = MethodOptions(1.0 if density is None else density, majority_sign or "total", seed, eps)
        self.check(options, density_given=density is not None, sign_given=majority_sign is not None, epsilon_given=epsilon is not None)
        return options

    def describe(self, options: MethodOptions) -> dict[str, object]:
        """The method and the options it reads, for ``--json`` reports: name, density, majority sign, epsilon, seed."""
        info: dict[str, object] = {"name": self.name}
        if self.uses_density:
            info["density"] = options.density
        if self.uses_sign:
            info["majority_sign"] = options.majority_sign
        if self.uses_epsilon:
            info["epsilon"] = options.epsilon
        if self.random:
            info["seed"] = options.seed
        return info

    def check(self, options: MethodOptions, *, density_given: bool, sign_given: bool, epsilon_given: bool = False) -> None:
        """Refuse options this method does not read (a silent no-op would hide a mistake) and out-of-range ones."""
        if density_given and not self.uses_density:
            raise ArgumentError(f"method {self.name} has no density (use ties, dare, dare_ties, della or magnitude_prune)")
        if sign_given and not self.uses_sign:
            raise ArgumentError(f"method {self.name} elects no sign, so --majority-sign does not apply")
        if epsilon_given and not self.uses_epsilon:
            raise ArgumentError(f"method {self.name} has no epsilon (use della or della_linear)")
        d = options.density
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and 0 < d <= 1):
            raise ArgumentError(f"density must be in (0, 1], got {d!r} (density 0 would keep nothing: DARE's 1/p rescale is undefined)")
        eps = options.epsilon
        if self.uses_epsilon and d < 1 and not (isinstance(eps, (int, float)) and 0 <= eps and d - eps > 0 and d + eps <= 1):
            raise ArgumentError(
                f"epsilon must keep density ± epsilon inside (0, 1], got density {d!r}, epsilon {options.epsilon!r} (lower --epsilon)"
            )
        if options.majority_sign not in MAJORITY_SIGNS:
            raise ArgumentError(f"majority sign must be one of {', '.join(MAJORITY_SIGNS)}, got {options.majority_sign!r}")


def module_generator(seed: int, module: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, module name): reproducible per module whatever order modules run in.

    ``add`` and ``merge`` run modules in different orders and threads; deriving each module's stream
    from its adapter module name (``merge`` too, not the base tensor's key; see
    ``merging.combination.Combination``) and drawing in B·A's orientation gives both the same drops
    for the same seed.
    """
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def keep_all(delta: torch.Tensor, options: MethodOptions, gen: torch.Generator | None, pool: Executor | None) -> Kept:
    """The select step of methods that keep every entry (task arithmetic)."""
    return Kept()


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions | None = None) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ, as PEFT's ``(task_tensors * weights).sum(dim=0)`` adds (see :func:`ordered_sum`)."""
    return ordered_sum([d * w for d, w in zip(deltas, weights, strict=True)])


def ordered_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """+0 + p₀ + p₁ + ..., in order: what torch's ``stack(parts).sum(0)`` computes, bit for bit, for up to 4
    parts and for row blocks of 2¹⁹+ entries (measured, torch 2.13 CPU), without the stack's copy."""
    total = parts[0] + 0.0  # a reduction starts from +0, so an all -0.0 entry sums to +0.0
    for part in parts[1:]:
        total.add_(part)
    return total


def ties_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions) -> torch.Tensor:
    """TIES's join, PEFT's ``calculate_majority_sign_mask`` then ``disjoint_merge``, entry by entry.

    The elected sign is + where the vote (Σ τᵢ, or Σ sign τᵢ for ``frequency``) is >= 0; the
    copysign of the vote equals it wherever some τᵢ is nonzero (a vote of -0.0 needs every τᵢ zero,
    and zeros agree with neither sign).  Agreement τᵢ·sign > 0 is PEFT's sign(τᵢ) == elected.
    Then ΔW = Σ (wᵢ·τᵢ)·agreeᵢ / max(1, Σ agreeᵢ), summed as :func:`ordered_sum`.
    """
    votes = ordered_sum(deltas if options.majority_sign == "total" else [d.sign() for d in deltas])
    elected = torch.copysign(_ONE, votes, out=votes)  # ±1, in place
    count, agree, part = (_scratch(i, votes) for i in range(3))
    mixed = torch.zeros_like(votes)
    count.zero_()
    for d, w in zip(deltas, weights, strict=True):
        torch.gt(torch.mul(d, elected, out=agree), 0, out=agree)  # float 0/1
        # + (wᵢ·τᵢ)·agreeᵢ: the product by 0/1 is exact, so a fused multiply-add rounds as the separate steps do;
        # a non-agreeing ±0 vanishes in the sum, which starts from +0
        mixed.addcmul_(d if w == 1 else torch.mul(d, w, out=part), agree)
        count.add_(agree)
    return mixed.div_(count.clamp_(min=1))


@dataclass(frozen=True)
class JoinPlan:
    """What the fused join needs of each input, worked out once per tensor: λ before and from the tied cut, the cut
    (a flat index; the tensor's size when there is none), keep mode (0 threshold, 1 all, 2 none), divisor and weight."""

    mode: int  # fused.methods.join's: 0 weighted sum, 1 TIES by Σ τ, 2 TIES by Σ sign τ
    lam_before: np.ndarray
    lam_after: np.ndarray
    cut: np.ndarray
    keep: np.ndarray
    divisor: np.ndarray
    weights: np.ndarray


def join_plan(
    method: Method, options: MethodOptions, kept: Sequence[Kept], weights: Sequence[float], dtype: torch.dtype
) -> JoinPlan | None:
    """The :class:`JoinPlan` of these inputs, or None when the join cannot be fused (a mask or a per-entry divisor
    kept, a join other than :func:`weighted_sum` / :func:`ties_mean`, a dtype other than float32/float64)."""
    modes: dict[Join, int] = {weighted_sum: 0, ties_mean: 1}
    mode = modes.get(method.join)
    if mode is None or dtype not in (torch.float32, torch.float64):
        return None
    if any(k.mask is not None or isinstance(k.divisor, torch.Tensor) for k in kept):
        return None
    count = len(kept)
    lam_before, lam_after, divisor = np.zeros(count), np.zeros(count), np.ones(count)
    cut, keep = np.full(count, np.iinfo(np.int64).max, dtype=np.int64), np.zeros(count, dtype=np.int8)
    for i, k in enumerate(kept):
        if k.nothing:
            keep[i] = 2
        elif k.threshold is None:
            keep[i] = 1  # Kept.apply returns a kept-all block as it is, undivided
        else:  # hardshrink at the float below the threshold (|x| >= t), or at t itself from the tied cut on
            t = k.threshold.to(dtype).numpy()
            lam_before[i] = float(np.nextafter(t, t.dtype.type(-math.inf)))
            lam_after[i] = float(t)
            cut[i] = k.cut if k.strict else cut[i]
            divisor[i] = 1.0 if k.divisor is None else float(k.divisor)  # type: ignore[arg-type]  # tensors refused above
    mode += int(mode == 1 and options.majority_sign == "frequency")
    return JoinPlan(mode, lam_before, lam_after, cut, keep, divisor, np.asarray(weights, dtype=np.float64))


def join_rows(
    method: Method,
    options: MethodOptions,
    kept: Sequence[Kept],
    blocks: torch.Tensor | Sequence[torch.Tensor],
    r0: int,
    weights: Sequence[float],
    plan: JoinPlan | None,
    out: torch.Tensor | None = None,
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Rows ``r0:`` of the method's ΔW from the same rows of every input's ΔW, ``blocks`` (one 2-D block per input,
    or all of them stacked, which the compiled pass reads without a copy).

    Each input's :meth:`Kept.apply`, then the method's ``join``.  Given the inputs' ``plan``
    (:func:`join_plan`, worked out once per tensor), both run as one compiled pass
    (:func:`loratools.fused.methods.join`; a pair of inputs :func:`~loratools.fused.methods.join_pair`):
    the same float operations in the same order, so the same bits, about 5x cheaper, into ``out``
    (flat, at least rows·cols) when given.  Without a plan, the torch steps.  ``scales``: each
    input's ΔW is ``blocks[i] · scales[i]`` (products B·A and their s), 1 when not given.
    """
    count, rows = len(blocks), blocks[0].shape[0]
    if plan is None:
        if scales is not None:
            blocks = [b * s for b, s in zip(blocks, scales, strict=True)]
        return method.join([k.apply(b, r0, r0 + rows) for k, b in zip(kept, blocks, strict=True)], weights, options)
    from ..fused import methods as fused  # numba: imported by the merge methods' CPU paths only

    cols = blocks[0].shape[1]
    n = rows * cols
    out = torch.empty(n, dtype=blocks[0].dtype) if out is None else out[:n]
    start = np.clip(plan.cut - r0 * cols, 0, n)  # the block's own positions of the tied cuts
    flat = (blocks if isinstance(blocks, torch.Tensor) else torch.stack(list(blocks))).reshape(count, -1).numpy()
    factors = np.ones(count) if scales is None else np.asarray(scales, dtype=np.float64)
    if count == 2 and not (plan.keep == 2).any():  # the common pair, one vectorized step per entry
        lam = np.where((plan.keep == 1)[:, None], -math.inf, np.stack([plan.lam_before, plan.lam_after], axis=1))
        first, second = np.sort(start)
        segments = np.array([[lam[i, 0] if e < start[i] else lam[i, 1] for i in range(2)] for e in (0, first, second)])
        fused.join_pair(flat, factors, segments, np.array([first, second, n]), plan.divisor, plan.weights, plan.mode, out.numpy())
    else:
        thresholds = (plan.lam_before, plan.lam_after, start, plan.keep, plan.divisor)
        fused.join(flat, factors, *thresholds, plan.weights, plan.mode, out.numpy())
    return out.view(rows, cols)


def _scratch(slot: int, like: torch.Tensor) -> torch.Tensor:
    """A per-thread work buffer shaped as ``like`` (:mod:`loratools.scratch`; off the CPU a fresh tensor)."""
    if like.device.type != "cpu":
        return torch.empty_like(like)
    return buffer(f"methods-{slot}", like.numel(), like.dtype, least=_CHUNK).view(like.shape)


_ONE = torch.ones(())


def select_drop(delta: torch.Tensor, options: MethodOptions, gen: torch.Generator | None, pool: Executor | None = None) -> Kept:
    """DARE's drop as a :class:`Kept`: keep each entry with probability p = density (independently), rescale by 1/p."""
    if options.density >= 1:
        return Kept()
    draws = torch.rand(delta.shape, generator=gen, device=delta.device, dtype=delta.dtype)
    return Kept(mask=torch.lt(draws, options.density, out=draws), divisor=options.density)  # float 0/1, in place


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's drop on a whole tensor: keep each entry with probability ``density``, rescale kept ones by 1/density."""
    return select_drop(delta, MethodOptions(density), generator).apply(delta, 0, delta.shape[0])
