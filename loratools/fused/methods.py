"""A merge method's two CPU passes: the threshold scan of its selection and the entrywise join of threshold-kept inputs.

The rules are those of :mod:`loratools.methods.base` (PEFT's ``magnitude_based_pruning``,
``calculate_majority_sign_mask`` and ``disjoint_merge``); these loops only fuse them.  The torch
versions make about fifteen passes over each row block; these make one, in tiles that stay in
the first-level cache.
"""

from __future__ import annotations

import numpy as np

from .jit import compiled, reduction

_TILE = 1024
_U = np.uint64  # loop indices: numba wraps a signed index for negative values, which stops LLVM vectorizing


@compiled
def scan(values: np.ndarray, scale: float, low: np.integer, high: np.integer, finite: np.integer, out: np.ndarray) -> tuple[int, int]:
    """How many |x| exceed ``high`` and the |x| within [``low``, ``high``], in order, for x = ``values · scale``
    (float32: the product as a merge kernel rounds it; B·A and its s, or ΔW and 1).

    ``low``/``high``: the bits of the (non-negative) bracket ends, ``finite`` those of +inf.  For
    non-negative floats the integer order is the float order, so one unsigned subtraction tests the
    bracket (a wide one: below ``low`` it wraps far above); a NaN (bits above +inf) is neither
    above nor inside, as float comparisons have it.  ``out`` (uint32, as long as ``values``)
    receives the bits of the |x| inside; returns (above, inside).
    """
    span = np.uint64(high) - np.uint64(low)
    lo = np.uint64(low)
    s = np.float32(scale)
    above = 0
    n = 0
    for i in range(values.size):
        a = np.float32(values[i] * s).view(np.uint32) & np.uint32(0x7FFFFFFF)
        above += np.int64(a > high) - np.int64(a > finite)
        if np.uint64(a) - lo <= span:
            out[n] = a
            n += 1
    return above, n


@compiled
def join(
    deltas: np.ndarray,
    scales: np.ndarray,
    lam_before: np.ndarray,
    lam_after: np.ndarray,
    start: np.ndarray,
    keep: np.ndarray,
    divisor: np.ndarray,
    weights: np.ndarray,
    mode: int,
    out: np.ndarray,
) -> None:
    """``out`` = the join of the inputs' kept entries of ``deltas[i] · scales[i]``, for inputs
    that keep by magnitude threshold (or keep all).  ``deltas`` may hold products B·A and ``scales`` their s (ΔW is
    their float32 product, as a merge kernel forms it) or ΔW itself and 1 (an exact product).

    Input i keeps x where not |x| <= λ (``torch.hardshrink``'s rule: NaN is kept), λ =
    ``lam_before[i]`` at positions below ``start[i]`` and ``lam_after[i]`` from
    there; ``keep[i]`` 1 keeps every entry, 2 none (all +0); kept entries are divided by ``divisor[i]`` (1: none).
    ``mode`` 0: Σ wᵢ·τᵢ summed in input order from +0 (:func:`~loratools.methods.base.weighted_sum`);
    1 and 2: TIES's disjoint mean with the sign elected by Σ τᵢ (1) or Σ sign τᵢ (2)
    (:func:`~loratools.methods.base.ties_mean`).  Every step is the same float operation, in the
    same order, as the torch version, so the bits are the same.
    """
    count = deltas.shape[0]
    m = out.size
    dtype = out.dtype.type
    tau = np.empty((count, _TILE), out.dtype)
    vote = np.empty(_TILE, out.dtype)
    mixed = np.empty(_TILE, out.dtype)
    agreeing = np.empty(_TILE, out.dtype)
    zero = dtype(0.0)
    one = dtype(1.0)
    for t0 in range(0, m, _TILE):
        w = min(_TILE, m - t0)
        for i in range(count):
            src = deltas[i]
            row = tau[i]
            base = _U(t0)
            div = dtype(divisor[i])
            sc = dtype(scales[i])
            if keep[i] == 1:
                for t in range(_U(w)):
                    row[t] = src[base + t] * sc
                continue
            if keep[i] == 2:
                for t in range(_U(w)):
                    row[t] = zero
                continue
            cut = _U(min(max(start[i] - t0, 0), w))
            lam = dtype(lam_before[i])
            for t in range(cut):
                x = src[base + t] * sc
                row[t] = (zero if abs(x) <= lam else x) / div
            lam = dtype(lam_after[i])
            for t in range(_U(w) - cut):
                x = src[base + cut + t] * sc
                row[cut + t] = (zero if abs(x) <= lam else x) / div
        for t in range(_U(w)):
            vote[t] = zero
        if mode == 0:
            for i in range(count):
                row = tau[i]
                wi = dtype(weights[i])
                for t in range(_U(w)):
                    vote[t] = vote[t] + row[t] * wi
            for t in range(_U(w)):
                out[_U(t0) + t] = vote[t]
            continue
        for t in range(_U(w)):
            mixed[t] = zero
            agreeing[t] = zero
        for i in range(count):
            row = tau[i]
            if mode == 1:
                for t in range(_U(w)):
                    vote[t] = vote[t] + row[t]
            else:
                for t in range(_U(w)):
                    x = row[t]
                    vote[t] = vote[t] + (dtype(x > zero) - dtype(x < zero))
        for t in range(_U(w)):
            vote[t] = np.copysign(one, vote[t])
        for i in range(count):
            row = tau[i]
            wi = dtype(weights[i])
            plain = weights[i] == 1.0
            for t in range(_U(w)):
                x = row[t]
                agree = dtype(x * vote[t] > zero)
                part = x if plain else x * wi
                mixed[t] = mixed[t] + part * agree
                agreeing[t] = agreeing[t] + agree
        for t in range(_U(w)):
            out[_U(t0) + t] = mixed[t] / max(agreeing[t], one)


@reduction
def sample(B: np.ndarray, At: np.ndarray, scale: float, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
    """``out[p] += (B[rows[p]] · At[cols[p]]) · scale``: entries of B·A (At = Aᵀ, contiguous) at given positions without forming it.

    Float32 sums in any order: the values only bracket a threshold (:func:`~loratools.methods.select_top_rows`).
    """
    r = B.shape[1]
    s = np.float32(scale)
    for p in range(out.size):
        i = rows[p]
        j = cols[p]
        acc = np.float32(0.0)
        for q in range(r):
            acc += B[i, q] * At[j, q]
        out[p] += acc * s


@compiled
def join_pair(
    deltas: np.ndarray,
    scales: np.ndarray,
    lam: np.ndarray,
    cuts: np.ndarray,
    divisor: np.ndarray,
    weights: np.ndarray,
    mode: int,
    out: np.ndarray,
) -> None:
    """:func:`join` for two inputs that keep by threshold or keep all, each entry in one vectorized step.

    ``lam[s, i]``: input i's λ in segment s of the block, the segments split at ``cuts`` (three
    ascending positions; a kept-all input has λ = −inf, which keeps every entry, NaN too, as
    ``join`` does).  Every float operation is :func:`join`'s, in its order.
    """
    dtype = out.dtype.type
    zero = dtype(0.0)
    one = dtype(1.0)
    s0, s1 = dtype(scales[0]), dtype(scales[1])
    d0, d1 = dtype(divisor[0]), dtype(divisor[1])
    w0, w1 = dtype(weights[0]), dtype(weights[1])
    plain0, plain1 = weights[0] == 1.0, weights[1] == 1.0
    a_row, b_row = deltas[0], deltas[1]
    start = 0
    for seg in range(3):
        stop = cuts[seg]
        la, lb = dtype(lam[seg, 0]), dtype(lam[seg, 1])
        base = _U(start)
        for t in range(_U(max(stop - start, 0))):
            j = base + t
            a = a_row[j] * s0
            b = b_row[j] * s1
            a = (zero if abs(a) <= la else a) / d0
            b = (zero if abs(b) <= lb else b) / d1
            if mode == 0:
                out[j] = (zero + a * w0) + b * w1
                continue
            if mode == 1:
                vote = (zero + a) + b
            else:
                vote = (zero + (dtype(a > zero) - dtype(a < zero))) + (dtype(b > zero) - dtype(b < zero))
            e = np.copysign(one, vote)
            g0 = dtype(a * e > zero)
            g1 = dtype(b * e > zero)
            p0 = a if plain0 else a * w0
            p1 = b if plain1 else b * w1
            out[j] = ((zero + p0 * g0) + p1 * g1) / max((zero + g0) + g1, one)
        start = max(start, stop)
