"""TIES's trim step: which entries of one input's ΔW are its k = ⌊density·numel⌋ largest in magnitude.

The k-th largest |x| is found exactly without sorting: a sample of 2¹⁵ entries (fixed seed)
brackets it between two sample values, by 6 standard deviations of the sample's rank; one pass
(in cache-sized pieces, side by side on a pool) counts the entries above the bracket and gathers
those inside it (~3%), and ``kthvalue`` of the gathered ones is the answer.  A bracket that misses
(a sample unlike the whole: many equal values) falls back to ``kthvalue`` of the whole tensor, so
the result never depends on the sample.

The pass needs only row blocks of ΔW, so a merge can run it on blocks it computes from the
factors and drops (:func:`select_top_rows`) instead of forming the whole ΔW: the threshold found
is the same, because the counts and gathered values are the same entries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from ..scratch import buffer
from .base import Kept, Method, MethodOptions, keep_all

_CHUNK = 1 << 19  # elements per piece of a whole-tensor pass: a few MiB, so temporaries stay in cache
_SAMPLE = 1 << 15  # entries of the (seeded, uniform) sample that brackets a magnitude threshold


def _kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """``kthvalue(values, rank + 1)`` (0-d): on the CPU by numpy's introselect, ~3x faster, the same value."""
    if values.device.type != "cpu":
        return torch.kthvalue(values, rank + 1).values
    return torch.from_numpy(np.partition(values.numpy(), rank)[rank : rank + 1]).reshape(())


Rows = Callable[[int, int], tuple[torch.Tensor, float]]
"""Rows ``r0:r1`` of a ΔW (2-D, float) as (P, s), ΔW = P·s (a product B·A and its scale, or ΔW and 1), valid
until the next call on the same thread."""


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·numel⌋ entries of largest |x| over the whole tensor, zero the rest (density 1: unchanged)."""
    return select_top(delta, density).apply(delta, 0, delta.shape[0] if delta.dim() else 1)


def select_trim(delta: torch.Tensor, options: MethodOptions, gen: torch.Generator | None, pool: Executor | None = None) -> Kept:
    """The select step of TIES and magnitude pruning: :func:`select_top` at the options' density."""
    return select_top(delta, options.density, pool)


def select_top(delta: torch.Tensor, density: float, pool: Executor | None = None) -> Kept:
    """TIES's trim as a :class:`Kept`: the k = ⌊density·numel⌋ entries of largest |x| over the whole tensor.

    The k-th largest |x| is found exactly by :func:`kth_largest_magnitude`; when exactly k entries
    reach it, they are the top-k set, kept as |x| >= it (no mask stored).  When magnitudes tie at
    it (common for bf16 factors: their products take few distinct values), the top-k set is
    ambiguous: we keep every entry above it and the first tied ones in row-major order, which is
    deterministic and ~40x cheaper than PEFT's ``topk`` (``merge_utils.magnitude_based_pruning``),
    whose pick among equal magnitudes torch leaves unspecified; only those tied entries can differ.
    """
    if density >= 1:
        return Kept()
    flat = delta.reshape(-1)
    k = int(density * flat.numel())
    if k == 0:
        return Kept(nothing=True)
    threshold, reaching, tied = _kth(flat, k, pool)
    if reaching == k:
        return Kept(threshold=threshold)
    pieces = ((i, flat[i : i + _CHUNK]) for i in range(0, flat.numel(), _CHUNK))
    return Kept(threshold=threshold, strict=True, cut=_tied_cut(pieces, threshold, k - (reaching - tied)))


def select_top_rows(rows: Rows, shape: tuple[int, int], density: float, sample: torch.Tensor, pool: Executor | None) -> Kept | None:
    """:func:`select_top` of the ΔW of ``shape`` whose row blocks ``rows`` computes, without forming it whole.

    ``sample``: the |x| at :func:`sample_positions` (from the factors: rounded otherwise than the
    blocks is fine, the sample only brackets).  Row blocks are computed on ``pool``; with ties at
    the threshold they are computed once more, in order, up to the cut.  None when the bracket
    misses or the tensor is small: the caller forms the ΔW and calls :func:`select_top`.
    """
    if density >= 1:
        return Kept()
    n = shape[0] * shape[1]
    k = int(density * n)
    if k == 0:
        return Kept(nothing=True)
    if n <= 4 * _SAMPLE:
        return None
    bracket = Bracket.of(sample, k, n)
    step = max(1, _CHUNK // max(1, shape[1]))
    starts = range(0, shape[0], step)
    found = list((pool.map if pool is not None else map)(lambda r0: bracket.scan(*rows(r0, min(shape[0], r0 + step))), starts))
    result = bracket.threshold(found, k)
    if result is None:
        return None
    threshold, reaching, tied = result
    if reaching == k:
        return Kept(threshold=threshold)
    # each block's gathered magnitudes hold all its entries equal to the threshold: only the block with the cut is computed again
    need = k - (reaching - tied)
    for r0, (_, near) in zip(starts, found, strict=True):
        count = int((near == threshold).sum())
        if need <= count:
            product, scale = rows(r0, min(shape[0], r0 + step))
            piece = (product * scale).reshape(-1)
            return Kept(threshold=threshold, strict=True, cut=_tied_cut([(r0 * shape[1], piece)], threshold, need))
        need -= count
    raise AssertionError("fewer tied entries than counted")  # unreachable: the scan gathered them


def selects_by_magnitude(method: Method) -> bool:
    """Whether ``method`` keeps each input by its magnitude threshold (or keeps all), so :func:`select_top_rows` can select for it."""
    return method.select in (select_trim, keep_all)


def sample_rows(terms: tuple[tuple[torch.Tensor, torch.Tensor, float], ...], shape: tuple[int, int]) -> torch.Tensor:
    """ΔW = Σ (B·A)·s at :func:`sample_positions`, from the factors (float32 on the CPU, each entry r products): the
    values :func:`select_top_rows` brackets with, rounded otherwise than the blocks (a sample only brackets)."""
    from ..fused import methods as fused  # numba: imported by the merge methods' CPU paths only

    rows, cols = _sample_grid(shape)
    out = torch.zeros(rows.size)
    for B, A, s in terms:
        fused.sample(B.contiguous().numpy(), A.T.contiguous().numpy(), s, rows, cols, out.numpy())
    return out


@functools.lru_cache(maxsize=16)
def _sample_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_positions` of a (rows, cols) tensor as row and column indices (models repeat their shapes)."""
    positions = sample_positions(shape[0] * shape[1])
    return (positions // shape[1]).numpy(), (positions % shape[1]).numpy()


def sample_positions(n: int) -> torch.Tensor:
    """The flat positions of the bracketing sample of an n-entry tensor: uniform (a stride could follow the columns' scales), seed 0."""
    return torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0))


def kth_largest_magnitude(delta: torch.Tensor, k: int, pool: Executor | None = None) -> tuple[torch.Tensor, int]:
    """The k-th largest |x| of ``delta`` (exactly ``kthvalue``'s), and how many entries reach it (see the module docstring)."""
    threshold, reaching, _ = _kth(delta.reshape(-1), k, pool)
    return threshold, reaching


@dataclass(frozen=True)
class Bracket:
    """Two magnitudes around the k-th largest: the pass counts entries above ``high`` and gathers those in [``low``, ``high``].

    ``high`` None: the k-th largest is among the sample's largest, everything from ``low`` up is gathered.
    """

    low: torch.Tensor  # 0-d, the tensor's dtype
    high: torch.Tensor | None
    bits: tuple[np.uint32, np.uint32] | None = None  # float32: (low, high) as bits for the CPU scan (high None: +inf)

    @classmethod
    def of(cls, sample: torch.Tensor, k: int, n: int) -> Bracket:
        """The bracket of the k-th largest of n magnitudes from a uniform ``sample`` of them."""
        m = sample.numel()
        j = k * m / n  # the k-th largest's expected rank in the sample, from the top
        spread = 6 * math.sqrt(max(j * (1 - j / m), 1.0)) + 2  # a miss (about 2e-9) falls back, exactly
        top, bottom = int(j - spread), int(j + spread)  # ranks from the top, 0-based
        high = _kth_smallest(sample, m - top - 1) if top >= 0 else None
        low = _kth_smallest(sample, m - bottom - 1) if bottom < m else sample.new_zeros(())
        bits = (_bits(low), _bits(math.inf if high is None else high)) if sample.dtype == torch.float32 else None
        return cls(low, high, bits)

    def scan(self, piece: torch.Tensor, scale: float = 1.0) -> tuple[int, torch.Tensor]:
        """One piece's count of |x| above the bracket and its |x| inside it, in row-major order, x = ``piece · scale``.

        float32 on the CPU: one compiled pass on the float bits, the product formed in it
        (:func:`loratools.fused.methods.scan`), ~2x cheaper than numpy's compares and boolean
        gather; other dtypes and devices: torch's compares.  The same entries either way.
        """
        if piece.device.type == "cpu" and piece.dtype == torch.float32 and self.bits is not None:
            return _scan_cpu(piece.contiguous().reshape(-1), scale, *self.bits)
        a = (piece * scale if scale != 1.0 else piece).reshape(-1).abs()
        low = self.low.to(a.device, a.dtype)
        if self.high is None:
            return 0, a[a >= low]
        high = self.high.to(a.device, a.dtype)
        return int((a > high).sum()), a[(a >= low) & (a <= high)]

    def threshold(self, found: list[tuple[int, torch.Tensor]], k: int) -> tuple[torch.Tensor, int, int] | None:
        """(the k-th largest, how many entries reach it, how many equal it) from every piece's scan, or None when it is outside."""
        above = sum(count for count, _ in found)
        inside = torch.cat([near for _, near in found])
        need = k - above  # the need-th largest inside the bracket is the k-th largest overall
        if not 1 <= need <= inside.numel():
            return None
        threshold = _kth_smallest(inside, inside.numel() - need)
        return threshold, above + int((inside >= threshold).sum()), int((inside == threshold).sum())


def _scan_cpu(piece: torch.Tensor, scale: float, low: np.uint32, high: np.uint32) -> tuple[int, torch.Tensor]:
    """:meth:`Bracket.scan` of a flat float32 CPU piece; ``low``/``high``: the bracket's bits (:func:`_bits`)."""
    from ..fused import methods as fused  # numba: imported by the merge methods' CPU paths only

    out = buffer("magnitude-inside", piece.numel())
    above, count = fused.scan(piece.numpy(), scale, low, high, _INF_BITS, out.numpy().view(np.uint32))
    return int(above), out[:count].clone()


def _bits(value: torch.Tensor | float) -> np.uint32:
    """A float32 scalar's bits (``value`` a 0-d float32 tensor, or a float)."""
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
    return np.asarray(t.cpu().numpy()).view(np.uint32)[()]  # type: ignore[return-value]


_INF_BITS = _bits(math.inf)


def _kth(flat: torch.Tensor, k: int, pool: Executor | None) -> tuple[torch.Tensor, int, int]:
    """The k-th largest |x| of the flat tensor, how many entries reach it and how many equal it."""
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return _kth_whole(flat, k)
    bracket = Bracket.of(flat[sample_positions(n).to(flat.device)].abs(), k, n)
    found = list((pool.map if pool is not None else map)(lambda i: bracket.scan(flat[i : i + _CHUNK]), range(0, n, _CHUNK)))
    return bracket.threshold(found, k) or _kth_whole(flat, k)


def _kth_whole(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, flat.numel() - k + 1).values
    return threshold, int((magnitude >= threshold).sum()), int((magnitude == threshold).sum())


def _tied_cut(pieces: Iterable[tuple[int, torch.Tensor]], threshold: torch.Tensor, need: int) -> int:
    """The flat index just past the ``need``-th entry (row-major) whose |x| equals ``threshold``.

    ``pieces``: (flat offset, flat piece) in row-major order.  They are counted in order and the
    scan stops at the piece holding it, so only that piece is searched for positions.
    """
    seen = 0
    for offset, piece in pieces:
        equal = torch.eq(piece.abs(), threshold.to(piece.device))
        count = int(equal.sum())
        if seen + count >= need:
            return offset + int(torch.nonzero(equal)[need - seen - 1]) + 1
        seen += count
    raise AssertionError("fewer tied entries than counted")  # unreachable: the scan counted them
