"""FP8 e4m3fn block-scaled rows: decode, decode-and-merge, scales, and requantization with the survival norms.

The rules are those of :mod:`loratools.io.quant.fp8_block` (transformers' ``_dequantize_fp8_weight``
and ``Fp8Quantize._quantize_one``); these loops only fuse them.  Shapes: rows ``(n, k)``, scales
``(ceil(n / bm), ceil(k / bn))``, ragged edge blocks allowed; rows start on a block boundary.

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
_ABS = _I(0x7FFFFFFF)
_SIGN = _I(-0x80000000)
_QNAN = _I(0x7FC00000)
_REBIAS = _I(120 << 23)  # e4m3's exponent bias 7 against float32's 127
_MIN_NORMAL = np.float32(2.0**-6)  # e4m3's smallest normal
_STEP = np.float32(2.0**-9)  # e4m3's subnormal step
_ROUND = np.float32(2.0**23)  # (y + 2²³) − 2²³ rounds 0 <= y < 2²² to an integer, ties to even
_MAX = np.float32(448.0)


@compiled
def _expand(grid_row: np.ndarray, bn: int, out: np.ndarray) -> None:
    """``out[j] = grid_row[j // bn]`` for the ``out.size`` columns of a row."""
    for j in range(out.size):
        out[j] = grid_row[j // bn]


@compiled
def _decode_row(q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = float(q[j]) * scale[j]``: the byte's exponent and mantissa bits moved into place and rebiased are its
    float32 value; a subnormal (exponent 0) is built with exponent 1, less 2⁻⁶ (both exact, so no float32 subnormal
    appears under any denormal mode); 0x7F/0xFF are NaN."""
    for j in range(q.size):
        c = _I(q[j])
        mag = _I(c & _I(0x7F))
        sub = _I(mag < _I(8))  # 1 where the exponent is 0
        nan = _I(-_I(mag == _I(0x7F)))  # all ones for 0x7F and 0xFF
        bits = _I(_I(_I(mag | _I(sub << _I(3))) << _I(20)) + _REBIAS)
        v = np.int32(bits).view(np.float32) - np.float32(sub) * _MIN_NORMAL
        signed = _I(_I(np.float32(v).view(np.int32) | _I(_I(c & _I(0x80)) << _I(24))) | _I(_QNAN & nan))
        out[j] = np.int32(signed).view(np.float32) * scale[j]


@compiled
def decode(q: np.ndarray, scale: np.ndarray, bm: int, bn: int, out: np.ndarray) -> None:
    """``out[i, j] = float(q[i, j]) * scale[i // bm, j // bn]`` for e4m3 bytes ``q`` (uint8), float32 ``out``."""
    n, k = q.shape
    row_scale = np.empty(k, np.float32)
    for i in range(n):
        if i % bm == 0:
            _expand(scale[i // bm], bn, row_scale)
        _decode_row(q[i], row_scale, out[i])


@compiled
def decode_merge(q: np.ndarray, scale: np.ndarray, bm: int, bn: int, delta: np.ndarray, s: float, x: np.ndarray, amax: np.ndarray) -> None:
    """``x = float(q) · scale + delta · s`` (float32: the decoded weight plus the product rounded, as a merge kernel
    adds a term) and each block's ``amax`` of ``x`` (as :func:`block_amax`: int32 views, starting at 0), in one
    pass over ``q``; ``delta`` is B·A of the row block."""
    n, k = q.shape
    row_scale = np.empty(k, np.float32)
    row = np.empty(k, np.float32)
    column = np.zeros(k, np.int32)
    factor = np.float32(s)
    for i in range(n):
        if i % bm == 0:
            _expand(scale[i // bm], bn, row_scale)
        xrow, drow = x[i], delta[i]
        _decode_row(q[i], row_scale, row)
        for j in range(k):
            v = row[j] + drow[j] * factor
            xrow[j] = v
            column[j] = max(column[j], _I(np.float32(v).view(np.int32) & _ABS))
        if i % bm == bm - 1 or i == n - 1:
            _fold(column, bn, amax[i // bm])


@compiled
def _fold(column: np.ndarray, bn: int, acc: np.ndarray) -> None:
    """Each block's maximum of the per-column maxima ``column`` (int32 bits) into ``acc``; ``column`` is reset to 0."""
    for j in range(column.size):
        acc[j // bn] = max(acc[j // bn], column[j])
        column[j] = 0


@compiled
def block_amax(x: np.ndarray, bm: int, bn: int, out: np.ndarray) -> None:
    """``out[a, b] = max |x|`` over block (a, b); ``x`` and ``out`` float32 viewed as int32, ``out`` starting at 0.

    Taken on the bits: for |x| the integer order is the float order, and a NaN's bits exceed every
    number's, so a block holding one gets NaN, as torch's ``amax`` gives.
    """
    n, k = x.shape
    column = np.zeros(k, np.int32)
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
def _squares(e: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """(Σ e², Σ d²) in any order, float32 terms into float64 sums (a report's norms, never written)."""
    se = 0.0
    sd = 0.0
    for t in range(e.size):
        se += np.float64(e[t] * e[t])
        sd += np.float64(d[t] * d[t])
    return se, sd


@compiled
def _requantize_row(
    x: np.ndarray, base: np.ndarray, scale: np.ndarray, inv: np.ndarray, out: np.ndarray, e: np.ndarray, d: np.ndarray
) -> None:
    """One row: bytes ``out``, and the survival terms ``e = Q(x) − base``, ``d = x − base`` (see :func:`requantize`)."""
    for j in range(x.size):
        xv = x[j]
        v = min(max(xv * scale[j], -_MAX), _MAX)
        v = xv * scale[j] if xv != xv else v  # NaN stays NaN
        u = np.float32(v).view(np.int32)
        a = _I(u & _ABS)
        keep = _I(-_I(a > _I(0x3C7FFFFF)))  # all ones where |v| >= 2^-6: a normal
        nan = _I(-_I(a > _I(0x7F800000)))  # all ones for NaN
        r = _I(_I(_I(a + _I(0x7FFFF)) + _I(_I(a >> _I(20)) & _I(1))) >> _I(20))  # (exponent, 3 mantissa bits) rounded
        m = _I((abs(v) * np.float32(512.0) + _ROUND) - _ROUND)  # a subnormal's multiple of 2^-9
        code = _I(_I(_I(r - _I(960)) & keep) | _I(m & _I(~keep)))
        code = _I(_I(code & _I(~nan)) | _I(_I(0x7F) & nan))
        out[j] = np.uint8(_I(_I(code | _I(_I(u >> _I(24)) & _I(0x80))) & _I(0xFF)))
        sub = np.float32(np.float32(m) * _STEP).view(np.int32)
        value = _I(_I(_I(_I(r << _I(20)) & keep) | _I(sub & _I(~keep))) | _I(_I(u & _SIGN) | _I(_QNAN & nan)))
        b = base[j]
        e[j] = np.int32(value).view(np.float32) * inv[j] - b
        d[j] = xv - b


@compiled
def requantize(
    x: np.ndarray, q: np.ndarray, old: np.ndarray, scale: np.ndarray, inv: np.ndarray, bm: int, bn: int, out: np.ndarray
) -> tuple[float, float]:
    """Rows ``x`` stored as e4m3 bytes ``out`` (uint8) with multipliers ``scale`` (their inverses ``inv``, as stored);
    returns (‖Q(x) − W‖², ‖x − W‖²), Q(x) = float(byte) · inv, W = float(q) · old the base rows, decoded
    again a row at a time (cheaper than reading a stored copy).

    Per element ``clamp(x · scale, ±448)`` (NaN stays NaN), rounded to e4m3 as torch's cast does:
    to nearest, ties to even, on the float32 bits (3 mantissa bits for a normal; for a subnormal a
    multiple of 2⁻⁹, ``|v|·512`` rounded to an integer), NaN to 0x7F with its sign.  The rounded
    value is Q(x)'s before ``inv``, so the survival needs no second decode.
    """
    n, k = x.shape
    row_scale = np.empty(k, np.float32)
    row_inv = np.empty(k, np.float32)
    row_old = np.empty(k, np.float32)
    base = np.empty(k, np.float32)
    e = np.empty(k, np.float32)
    d = np.empty(k, np.float32)
    kept = 0.0
    delta = 0.0
    for i in range(n):
        if i % bm == 0:
            _expand(scale[i // bm], bn, row_scale)
            _expand(inv[i // bm], bn, row_inv)
            _expand(old[i // bm], bn, row_old)
        _decode_row(q[i], row_old, base)
        _requantize_row(x[i], base, row_scale, row_inv, out[i], e, d)
        se, sd = _squares(e, d)
        kept += se
        delta += sd
    return kept, delta
