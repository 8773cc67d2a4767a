"""The compiled loops of :mod:`loratools.fused.e4m3` (FP8 e4m3fn block-scaled rows), which call them.

The rules are those of :mod:`loratools.io.quant.fp8_block` (transformers' ``_dequantize_fp8_weight``
and ``Fp8Quantize._quantize_one``) and, for the terms a merge adds, of
:class:`~loratools.io.quant.base.LowRank` (``LowRank.apply`` is their torch reference); these loops
only fuse them.  :func:`merge_requantize` does a whole merge row block in one call: a strip of
blocks (about 512 columns, all rows of the block row) is decoded with W' formed in the same pass,
then its fresh scales are taken and it is requantized while it is still in cache, so no float32
copy of the rows is written to memory.  Shapes: rows ``(n, k)``, scales
``(ceil(n / bm), ceil(k / bn))``, ragged edge blocks allowed; rows start on a block boundary.

The entry points (the functions without a leading underscore) allocate nothing: their callers pass
the work buffers (any content) and a ``norms`` array (float64, 2) for the two sums they return, so
they run as machine code loaded without numba's runtime (:mod:`loratools.fused.native`) as well as
through numba's dispatch.

Written so that LLVM vectorizes the inner loops (each measured 2-6x slower otherwise): each row is
one flat loop, reading its block's scales from a row of them expanded once per block row;
integer work is int32 throughout (``_I(...)`` around each step: numba widens int32 arithmetic to
int64, which AVX2 cannot shift or select in vectors); choices are bit masks made from comparisons,
not conditional expressions (nor sign-shift tricks, which numba also widens).
"""

from __future__ import annotations

import numpy as np

from .jit import compiled, reduction

_I = np.int32
_U = np.uint64  # loop indices and offsets: numba wraps a signed index for negative values, which stops LLVM vectorizing
_ABS = _I(0x7FFFFFFF)
_SIGN = _I(-0x80000000)
_QNAN = _I(0x7FC00000)
_REBIAS = _I(120 << 23)  # e4m3's exponent bias 7 against float32's 127
_MIN_NORMAL = np.float32(2.0**-6)  # e4m3's smallest normal
_STEP = np.float32(2.0**-9)  # e4m3's subnormal step
_ROUND = np.float32(2.0**23)  # y + 2²³ rounds 0 <= y < 2²² to an integer, ties to even: its bits are 2²³'s plus it
_MAX = np.float32(448.0)
_MAX_BITS = np.float32(448.0).view(np.int32)
_NEG0 = np.float32(-0.0)  # the float that adds nothing: x + (-0.0) == x for every x, ±0 and NaN included
_ROUND_BITS = _ROUND.view(np.int32)


@compiled
def _expand(grid_row: np.ndarray, bn: int, out: np.ndarray) -> None:
    """``out[j] = grid_row[j // bn]`` for the ``out.size`` columns of a row."""
    for j in range(out.size):
        out[j] = grid_row[j // bn]


@compiled
def _value(byte: np.uint8) -> np.float32:
    """An e4m3 byte's float32 value: its exponent and mantissa bits moved into place and rebiased; a subnormal
    (exponent 0) is built with exponent 1, less 2⁻⁶ (both exact, so no float32 subnormal appears under any
    denormal mode); 0x7F/0xFF are NaN."""
    c = _I(byte)
    mag = _I(c & _I(0x7F))
    sub = _I(mag < _I(8))  # 1 where the exponent is 0
    nan = _I(-_I(mag == _I(0x7F)))  # all ones for 0x7F and 0xFF
    bits = _I(_I(_I(mag | _I(sub << _I(3))) << _I(20)) + _REBIAS)
    v = np.int32(bits).view(np.float32) - np.float32(sub) * _MIN_NORMAL
    signed = _I(_I(np.float32(v).view(np.int32) | _I(_I(c & _I(0x80)) << _I(24))) | _I(_QNAN & nan))
    return np.int32(signed).view(np.float32)


@compiled
def _decode_row(q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = float(q[j]) * scale[j]``."""
    for j in range(q.size):
        out[j] = _value(q[j]) * scale[j]


@compiled
def decode(q: np.ndarray, scale: np.ndarray, bm: int, bn: int, out: np.ndarray, row_scale: np.ndarray) -> None:
    """``out[i, j] = float(q[i, j]) * scale[i // bm, j // bn]`` for e4m3 bytes ``q`` (uint8), float32 ``out``;
    ``row_scale``: k floats of work space."""
    n, k = q.shape
    for i in range(n):
        if i % bm == 0:
            _expand(scale[i // bm], bn, row_scale)
        _decode_row(q[i], row_scale, out[i])


@compiled
def _product(B: np.ndarray, R: int, A: np.ndarray, k: int, o0: int, o1: int, i: int, j0: int, w: int, acc: np.ndarray) -> None:
    """``acc[j] = P[i, j0 + j]`` for j < ``w``, P = B·A over ranks ``o0:o1`` by
    :class:`~loratools.io.quant.base.LowRank`'s rule: the rank-one products accumulated in rank order, each
    rounded and then added.  ``B`` (n x R) and ``A`` (R x k) flat.

    The sum starts from -0.0, which adds nothing to any float (so it is the sum from the first
    product, bit for bit).  Eight ranks (then four, then one) a pass over ``acc``: the same
    additions in the same order, with ``acc`` read and written once per pass instead of once per rank.
    """
    row = i * R
    for j in range(_U(w)):
        acc[j] = _NEG0
    o = o0
    while o1 - o >= 8:
        b0, b1, b2, b3 = B[row + o], B[row + o + 1], B[row + o + 2], B[row + o + 3]
        b4, b5, b6, b7 = B[row + o + 4], B[row + o + 5], B[row + o + 6], B[row + o + 7]
        a0, a1, a2, a3 = _U(o * k + j0), _U((o + 1) * k + j0), _U((o + 2) * k + j0), _U((o + 3) * k + j0)
        a4, a5, a6, a7 = _U((o + 4) * k + j0), _U((o + 5) * k + j0), _U((o + 6) * k + j0), _U((o + 7) * k + j0)
        for j in range(_U(w)):
            acc[j] = (
                ((((((acc[j] + b0 * A[a0 + j]) + b1 * A[a1 + j]) + b2 * A[a2 + j]) + b3 * A[a3 + j]) + b4 * A[a4 + j]) + b5 * A[a5 + j])
                + b6 * A[a6 + j]
            ) + b7 * A[a7 + j]
        o += 8
    while o1 - o >= 4:
        b0, b1, b2, b3 = B[row + o], B[row + o + 1], B[row + o + 2], B[row + o + 3]
        a0, a1, a2, a3 = _U(o * k + j0), _U((o + 1) * k + j0), _U((o + 2) * k + j0), _U((o + 3) * k + j0)
        for j in range(_U(w)):
            acc[j] = (((acc[j] + b0 * A[a0 + j]) + b1 * A[a1 + j]) + b2 * A[a2 + j]) + b3 * A[a3 + j]
        o += 4
    while o < o1:
        b0 = B[row + o]
        a0 = _U(o * k + j0)
        for j in range(_U(w)):
            acc[j] = acc[j] + b0 * A[a0 + j]
        o += 1


@compiled
def _product2(
    B: np.ndarray, R: int, A: np.ndarray, k: int, o0: int, o1: int, i: int, j0: int, w: int, acc0: np.ndarray, acc1: np.ndarray
) -> None:
    """:func:`_product` for rows ``i`` and ``i + 1`` at once (into ``acc0``, ``acc1``): each load of A serves both
    rows, four ranks a pass (the same additions in the same order)."""
    r0 = i * R
    r1 = r0 + R
    for j in range(_U(w)):
        acc0[j] = _NEG0
        acc1[j] = _NEG0
    o = o0
    while o1 - o >= 4:
        b0, b1, b2, b3 = B[r0 + o], B[r0 + o + 1], B[r0 + o + 2], B[r0 + o + 3]
        c0, c1, c2, c3 = B[r1 + o], B[r1 + o + 1], B[r1 + o + 2], B[r1 + o + 3]
        p0, p1, p2, p3 = _U(o * k + j0), _U((o + 1) * k + j0), _U((o + 2) * k + j0), _U((o + 3) * k + j0)
        for j in range(_U(w)):
            a0, a1, a2, a3 = A[p0 + j], A[p1 + j], A[p2 + j], A[p3 + j]
            acc0[j] = (((acc0[j] + b0 * a0) + b1 * a1) + b2 * a2) + b3 * a3
            acc1[j] = (((acc1[j] + c0 * a0) + c1 * a1) + c2 * a2) + c3 * a3
        o += 4
    while o < o1:
        b0, c0 = B[r0 + o], B[r1 + o]
        p0 = _U(o * k + j0)
        for j in range(_U(w)):
            a0 = A[p0 + j]
            acc0[j] = acc0[j] + b0 * a0
            acc1[j] = acc1[j] + c0 * a0
        o += 1


@compiled
def _merge_rows(
    q: np.ndarray,
    q0: int,
    scale: np.ndarray,
    B: np.ndarray,
    R: int,
    A: np.ndarray,
    k: int,
    offsets: np.ndarray,
    factors: np.ndarray,
    i: int,
    two: bool,
    j0: int,
    w: int,
    acc: np.ndarray,
    dst: np.ndarray,
    d0: int,
    stride: int,
    column: np.ndarray,
    bases: np.ndarray,
) -> None:
    """``w`` merged values of row ``i`` (and of row ``i + 1`` when ``two``) from column ``j0`` into flat ``dst`` at
    ``d0`` (the next row ``stride`` further): the bytes at flat ``q0`` (``q0 + k``) decoded with their scales
    ``scale[:w]``, plus ``P_t · s_t`` for each term t in order (:func:`_product`; term t's ranks
    ``offsets[t]:offsets[t + 1]``, its scale ``factors[t]``), each product scaled, then added; and
    ``column[j] = max(column[j], |value| bits)``.  ``acc`` holds two rows of products; a non-empty ``bases``
    receives the decoded values at the same places as ``dst``."""
    keep = bases.size > 0
    rows = 2 if two else 1
    if factors.size == 1 and offsets[1] > offsets[0] and keep:  # one term: its pass also keeps the base and the maxima
        if two:
            _product2(B, R, A, k, offsets[0], offsets[1], i, j0, w, acc[:w], acc[w : 2 * w])
        else:
            _product(B, R, A, k, offsets[0], offsets[1], i, j0, w, acc)
        f = factors[0]
        for h in range(rows):
            d = _U(d0 + h * stride)
            c = _U(q0 + h * k)
            p = _U(h * w)
            for j in range(_U(w)):
                v = _value(q[c + j]) * scale[j]
                bases[d + j] = v
                y = v + acc[p + j] * f
                dst[d + j] = y
                column[j] = max(column[j], _I(np.float32(y).view(np.int32) & _ABS))
        return
    first = True
    for t in range(factors.size):
        o0, o1 = offsets[t], offsets[t + 1]
        if o1 == o0:
            continue
        if two:
            _product2(B, R, A, k, o0, o1, i, j0, w, acc[:w], acc[w : 2 * w])
        else:
            _product(B, R, A, k, o0, o1, i, j0, w, acc)
        f = factors[t]
        for h in range(rows):
            d = _U(d0 + h * stride)
            c = _U(q0 + h * k)
            p = _U(h * w)
            if first and keep:
                for j in range(_U(w)):
                    v = _value(q[c + j]) * scale[j]
                    bases[d + j] = v
                    dst[d + j] = v + acc[p + j] * f
            elif first:
                for j in range(_U(w)):
                    dst[d + j] = _value(q[c + j]) * scale[j] + acc[p + j] * f
            else:
                for j in range(_U(w)):
                    dst[d + j] = dst[d + j] + acc[p + j] * f
        first = False
    for h in range(rows):
        d = _U(d0 + h * stride)
        c = _U(q0 + h * k)
        if first:
            for j in range(_U(w)):
                dst[d + j] = _value(q[c + j]) * scale[j]
            if keep:
                for j in range(_U(w)):
                    bases[d + j] = dst[d + j]
        for j in range(_U(w)):
            column[j] = max(column[j], _I(np.float32(dst[d + j]).view(np.int32) & _ABS))


@compiled
def merge(
    qf: np.ndarray,
    scale: np.ndarray,
    terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    n: int,
    k: int,
    bm: int,
    bn: int,
    width: int,
    xf: np.ndarray,
    amax: np.ndarray,
    f32: np.ndarray,
    i32: np.ndarray,
) -> None:
    """``x = float(q) · scale + Σ_t P_t · s_t`` (:func:`_merge_rows`) and each block's ``amax`` of ``x`` (int32
    bits, starting at 0), in one pass over the bytes ``q`` (n x k), strips of ``width`` columns; ``q``, ``x`` and
    the terms' B and A (``loratools.fused.e4m3.Terms``) flat (a reshape would need numba's runtime); work space
    ``f32`` (3 · width floats), ``i32`` (width)."""
    Bf, Af, offsets, factors = terms
    R = offsets[offsets.size - 1]
    acc = f32[: 2 * width]
    row_scale = f32[2 * width : 3 * width]
    column = i32[:width]
    column[:] = 0
    for a in range(-(-n // bm)):
        i1 = min(n, a * bm + bm)
        for j0 in range(0, k, width):
            w = min(width, k - j0)
            _expand(scale[a, j0 // bn :], bn, row_scale[:w])
            for i in range(a * bm, i1, 2):
                _merge_rows(
                    qf, i * k + j0, row_scale, Bf, R, Af, k, offsets, factors, i, i + 1 < i1, j0, w, acc, xf, i * k + j0, k, column, xf[:0]
                )
            _fold(column[:w], bn, amax[a, j0 // bn :])


@compiled
def merge_requantize(
    qf: np.ndarray,
    old: np.ndarray,
    terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    n: int,
    k: int,
    bm: int,
    bn: int,
    width: int,
    of: np.ndarray,
    inv: np.ndarray,
    f32: np.ndarray,
    i32: np.ndarray,
    norms: np.ndarray,
) -> None:
    """:func:`merge`, :func:`scales` and :func:`requantize` a strip of blocks (``width`` columns) at a time, the
    merged strip held in a buffer that stays in cache: bytes ``out`` (n x k, uint8, flat as in :func:`merge`) and F32
    scale inverses ``inv``; ``norms`` = the two sums.  Work space ``f32`` (2 · bm · width + 7 · width floats),
    ``i32`` (width + width / bn)."""
    Bf, Af, offsets, factors = terms
    R = offsets[offsets.size - 1]
    span = bm * width
    strip = f32[:span]
    bases = f32[span : 2 * span]
    acc = f32[2 * span : 2 * span + 2 * width]
    row_old = f32[2 * span + 2 * width : 2 * span + 3 * width]
    row_scale = f32[2 * span + 3 * width : 2 * span + 4 * width]
    row_inv = f32[2 * span + 4 * width : 2 * span + 5 * width]
    e = f32[2 * span + 5 * width : 2 * span + 6 * width]
    d = f32[2 * span + 6 * width : 2 * span + 7 * width]
    column = i32[:width]
    maxima = i32[width : width + -(-width // bn)]
    e[:] = 0
    d[:] = 0
    column[:] = 0
    maxima[:] = 0
    kept = 0.0
    delta = 0.0
    for a in range(-(-n // bm)):
        i0 = a * bm
        i1 = min(n, i0 + bm)
        for j0 in range(0, k, width):
            w = min(width, k - j0)
            _expand(old[a, j0 // bn :], bn, row_old[:w])
            for i in range(i0, i1, 2):
                _merge_rows(
                    qf,
                    i * k + j0,
                    row_old,
                    Bf,
                    R,
                    Af,
                    k,
                    offsets,
                    factors,
                    i,
                    i + 1 < i1,
                    j0,
                    w,
                    acc,
                    strip,
                    (i - i0) * w,
                    w,
                    column,
                    bases,
                )
            _fold(column[:w], bn, maxima)
            for t in range(-(-w // bn)):
                m = np.int32(maxima[t]).view(np.float32)
                maxima[t] = 0
                sc = (np.float32(1.0) / m) * _MAX if m > 0 else np.float32(1.0)
                back = np.float32(1.0) / sc
                inv[a, j0 // bn + t] = back
                for j in range(t * bn, min(w, t * bn + bn)):
                    row_scale[j] = sc
                    row_inv[j] = back
            for i in range(i0, i1):
                _requantize_segment(strip, bases, (i - i0) * w, row_scale, row_inv, of, i * k + j0, w, e, d)
            se, sd = _sums(e, d, w)
            kept += se
            delta += sd
    norms[0] = kept
    norms[1] = delta


@compiled
def _fold(column: np.ndarray, bn: int, acc: np.ndarray) -> None:
    """Each block's maximum of the per-column maxima ``column`` (int32 bits) into ``acc``; ``column`` is reset to 0."""
    for j in range(column.size):
        acc[j // bn] = max(acc[j // bn], column[j])
        column[j] = 0


@compiled
def block_amax(x: np.ndarray, bm: int, bn: int, out: np.ndarray, column: np.ndarray) -> None:
    """``out[a, b] = max |x|`` over block (a, b); ``x`` and ``out`` float32 viewed as int32, ``out`` starting at 0;
    ``column``: k int32 of work space.

    Taken on the bits: for |x| the integer order is the float order, and a NaN's bits exceed every
    number's, so a block holding one gets NaN, as torch's ``amax`` gives.
    """
    n, k = x.shape
    column[:] = 0
    for i in range(n):
        row = x[i]
        for j in range(k):
            column[j] = max(column[j], _I(row[j] & _ABS))
        if i % bm == bm - 1 or i == n - 1:
            _fold(column, bn, out[i // bm])


@compiled
def scales(amax: np.ndarray, scale: np.ndarray, inv: np.ndarray) -> None:
    """``scale = 448 / amax`` (1 where amax is 0 or NaN), ``inv = 1 / scale``: ``Fp8Quantize``'s rule for F32 scales.

    As torch evaluates it: a number divided by a tensor is the tensor's reciprocal times the
    number, two float32 roundings (``Tensor.__rdiv__``).
    """
    for a in range(amax.shape[0]):
        for b in range(amax.shape[1]):
            m = amax[a, b]
            s = (np.float32(1.0) / m) * _MAX if m > 0 else np.float32(1.0)
            scale[a, b] = s
            inv[a, b] = np.float32(1.0) / s


@reduction
def _squares(e: np.ndarray, d: np.ndarray, w: int) -> tuple[float, float]:
    """(Σ e², Σ d²) over the first ``w`` entries in any order, float32 terms into float64 sums (a report's norms, never written)."""
    se = 0.0
    sd = 0.0
    for t in range(w):
        se += np.float64(e[t] * e[t])
        sd += np.float64(d[t] * d[t])
    return se, sd


@compiled
def _e4m3(xv: np.float32, scale: np.float32) -> tuple[np.int32, np.float32]:
    """``clamp(xv · scale, ±448)`` (NaN stays NaN) rounded to e4m3 as torch's cast does: (the byte, its value before
    the scale inverse).  To nearest, ties to even, on the float32 bits: for a normal, 3 mantissa bits; for a
    subnormal a multiple of 2⁻⁹, ``|v|·512 + 2²³`` rounding it to an integer, which its low bits then hold.
    NaN goes to 0x7F with its sign.  The clamp is taken on |v|'s bits (their integer order is the float order),
    NaN set apart first."""
    u = np.float32(xv * scale).view(np.int32)
    a = _I(u & _ABS)
    nan = _I(-_I(a > _I(0x7F800000)))  # all ones for NaN
    a = min(a, _MAX_BITS)
    keep = _I(-_I(a > _I(0x3C7FFFFF)))  # all ones where |v| >= 2^-6: a normal
    r = _I(_I(_I(a + _I(0x7FFFF)) + _I(_I(a >> _I(20)) & _I(1))) >> _I(20))  # (exponent, 3 mantissa bits) rounded
    t = np.int32(a).view(np.float32) * np.float32(512.0) + _ROUND  # a subnormal's multiple of 2^-9, in the low bits
    m = _I(np.float32(t).view(np.int32) - _ROUND_BITS)
    code = _I(_I(_I(r - _I(960)) & keep) | _I(m & _I(~keep)))
    code = _I(_I(code & _I(~nan)) | _I(_I(0x7F) & nan))
    byte = _I(_I(code | _I(_I(u >> _I(24)) & _I(0x80))) & _I(0xFF))
    sub = np.float32((t - _ROUND) * _STEP).view(np.int32)
    value = _I(_I(_I(_I(r << _I(20)) & keep) | _I(sub & _I(~keep))) | _I(_I(u & _SIGN) | _I(_QNAN & nan)))
    return byte, np.int32(value).view(np.float32)


@compiled
def _requantize_row(
    x: np.ndarray, base: np.ndarray, scale: np.ndarray, inv: np.ndarray, out: np.ndarray, e: np.ndarray, d: np.ndarray
) -> None:
    """One row: bytes ``out``, and the survival terms ``e = Q(x) − base``, ``d = x − base`` (see :func:`requantize`)."""
    for j in range(x.size):
        xv = x[j]
        byte, value = _e4m3(xv, scale[j])
        out[j] = np.uint8(byte)
        b = base[j]
        e[j] = value * inv[j] - b
        d[j] = xv - b


@compiled
def _requantize_segment(
    x: np.ndarray,
    bases: np.ndarray,
    x0: int,
    scale: np.ndarray,
    inv: np.ndarray,
    out: np.ndarray,
    q0: int,
    w: int,
    e: np.ndarray,
    d: np.ndarray,
) -> None:
    """:func:`_requantize_row` for ``w`` values at flat ``x0`` of ``x`` (their base values at the same places in
    ``bases``), bytes into flat ``out`` at ``q0``, scales ``scale``/``inv`` per value; the squared survival
    terms are added to ``e`` and ``d`` per column (float32 sums over one strip's rows, a report's)."""
    for j in range(_U(w)):
        xv = x[_U(x0) + j]
        byte, value = _e4m3(xv, scale[j])
        out[_U(q0) + j] = np.uint8(byte)
        b = bases[_U(x0) + j]
        ej = value * inv[j] - b
        dj = xv - b
        e[j] = e[j] + ej * ej
        d[j] = d[j] + dj * dj


@reduction
def _sums(e: np.ndarray, d: np.ndarray, w: int) -> tuple[float, float]:
    """(Σ e, Σ d) over the first ``w`` entries into float64, in any order; both reset to 0."""
    se = 0.0
    sd = 0.0
    for t in range(w):
        se += np.float64(e[t])
        sd += np.float64(d[t])
        e[t] = 0
        d[t] = 0
    return se, sd


@compiled
def requantize(
    x: np.ndarray,
    q: np.ndarray,
    old: np.ndarray,
    scale: np.ndarray,
    inv: np.ndarray,
    bm: int,
    bn: int,
    out: np.ndarray,
    f32: np.ndarray,
    norms: np.ndarray,
) -> None:
    """Rows ``x`` stored as e4m3 bytes ``out`` (uint8) with multipliers ``scale`` (their inverses ``inv``, as stored);
    ``norms`` = (‖Q(x) − W‖², ‖x − W‖²), Q(x) = float(byte) · inv, W = float(q) · old the base rows, decoded
    again a row at a time (cheaper than reading a stored copy); work space ``f32`` (6 · k floats).

    Per element ``clamp(x · scale, ±448)`` (NaN stays NaN), rounded to e4m3 as torch's cast does:
    to nearest, ties to even, on the float32 bits (3 mantissa bits for a normal; for a subnormal a
    multiple of 2⁻⁹, ``|v|·512`` rounded to an integer), NaN to 0x7F with its sign.  The rounded
    value is Q(x)'s before ``inv``, so the survival needs no second decode.
    """
    n, k = x.shape
    row_scale, row_inv, row_old = f32[:k], f32[k : 2 * k], f32[2 * k : 3 * k]
    base, e, d = f32[3 * k : 4 * k], f32[4 * k : 5 * k], f32[5 * k : 6 * k]
    kept = 0.0
    delta = 0.0
    for i in range(n):
        if i % bm == 0:
            _expand(scale[i // bm], bn, row_scale)
            _expand(inv[i // bm], bn, row_inv)
            _expand(old[i // bm], bn, row_old)
        _decode_row(q[i], row_old, base)
        _requantize_row(x[i], base, row_scale, row_inv, out[i], e, d)
        se, sd = _squares(e, d, k)
        kept += se
        delta += sd
    norms[0] = kept
    norms[1] = delta
