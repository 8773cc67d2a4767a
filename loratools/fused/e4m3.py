"""FP8 e4m3fn block-scaled rows: decode, merge of low-rank terms, scales, and requantization with the survival norms.

The calls the FP8 codec (:mod:`loratools.io.quant.fp8_block`) makes; the loops themselves are
:mod:`loratools.fused.e4m3_loops` (their rules and shapes are documented there).  Each call sizes
the loop's work space and runs it from the image :mod:`loratools.fused.native` links (no numba in
the process) or, where there is none yet, through numba, which then builds it.  Importing this
module imports neither numba nor llvmlite; :func:`load` (or the first call) does.
"""

from __future__ import annotations

import numpy as np

from .native import INT, Array, Entry, Group, Loops

Terms = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Low-rank terms side by side: B (n x R) for the n rows, A (R x k), each term's rank offsets (T + 1, int64), its
scales (T, float32); term t is ranks ``offsets[t]:offsets[t + 1]``."""

_STRIP = 512  # columns of a merged strip (see strip_width)

_U8, _I32, _F32 = Array("uint8", 2), Array("int32", 2), Array("float32", 2)  # read
_OUT_U8, _OUT_I32, _OUT_F32 = Array("uint8", 2, writes=True), Array("int32", 2, writes=True), Array("float32", 2, writes=True)
_FLAT_U8, _FLAT_F32, _FLAT_I64 = Array("uint8", 1), Array("float32", 1), Array("int64", 1)
_FLAT_OUT_U8, _FLAT_OUT_F32 = Array("uint8", 1, writes=True), Array("float32", 1, writes=True)
_WORK_F32, _WORK_I32, _NORMS = Array("float32", 1, writes=True), Array("int32", 1, writes=True), Array("float64", 1, writes=True)
_TERMS = Group((_FLAT_F32, _FLAT_F32, _FLAT_I64, _FLAT_F32))  # B and A flat, offsets, factors
_STRIPS = (INT, INT, INT, INT, INT)  # n, k, bm, bn, width
ENTRIES = (
    Entry("decode", (_U8, _F32, INT, INT, _OUT_F32, _WORK_F32)),
    Entry("merge", (_FLAT_U8, _F32, _TERMS, *_STRIPS, _FLAT_OUT_F32, _OUT_I32, _WORK_F32, _WORK_I32)),
    Entry("merge_requantize", (_FLAT_U8, _F32, _TERMS, *_STRIPS, _FLAT_OUT_U8, _OUT_F32, _WORK_F32, _WORK_I32, _NORMS)),
    Entry("block_amax", (_I32, INT, INT, _OUT_I32, _WORK_I32)),
    Entry("scales", (_F32, _OUT_F32, _OUT_F32)),
    Entry("requantize", (_F32, _U8, _F32, _F32, _F32, INT, INT, _OUT_U8, _WORK_F32, _NORMS)),
)
"""The loops' arguments; sizes (``INT``) must be positive, so each call returns at once on empty rows."""
LOOPS = Loops("loratools.fused.e4m3_loops", ENTRIES)


def strip_width(bn: int, k: int) -> int:
    """Columns merged as one strip: whole blocks, about :data:`_STRIP` wide: each row's stretch of bytes long enough
    for the prefetcher, a 128-row strip's merged values and bases about the size of a second-level cache (512
    measured faster than 128, 256 and about level with 384 and 1024)."""
    return min(max(1, _STRIP // bn) * bn, -(-k // bn) * bn)


def decode(q: np.ndarray, scale: np.ndarray, bm: int, bn: int, out: np.ndarray) -> None:
    """``out[i, j] = float(q[i, j]) * scale[i // bm, j // bn]`` for e4m3 bytes ``q`` (uint8), float32 ``out``."""
    if q.size:
        LOOPS.call("decode", q, scale, bm, bn, out, np.empty(q.shape[1], np.float32))


def merge(q: np.ndarray, scale: np.ndarray, terms: Terms, bm: int, bn: int, x: np.ndarray, amax: np.ndarray) -> None:
    """``x = float(q) · scale + Σ_t P_t · s_t`` (products by ``LowRank``'s rule) and each block's ``amax`` of ``x``
    (int32 bits, starting at 0), in one pass over the bytes ``q`` (n x k)."""
    n, k = q.shape
    if not q.size:
        return
    width = strip_width(bn, k)
    work = np.empty(3 * width, np.float32), np.empty(width, np.int32)
    LOOPS.call("merge", _flat(q), scale, _flat_terms(terms), n, k, bm, bn, width, _flat(x), amax, *work)


def merge_requantize(
    q: np.ndarray, old: np.ndarray, terms: Terms, bm: int, bn: int, out: np.ndarray, inv: np.ndarray
) -> tuple[float, float]:
    """:func:`merge`, :func:`scales` and :func:`requantize` a strip of blocks at a time, the merged strip kept in
    cache: bytes ``out`` (n x k, uint8) and F32 scale inverses ``inv``; returns (‖Q(x) − W‖², ‖x − W‖²)."""
    n, k = q.shape
    if not q.size:
        return 0.0, 0.0
    width = strip_width(bn, k)
    work = np.empty(2 * bm * width + 7 * width, np.float32), np.empty(width + -(-width // bn), np.int32)
    norms = np.zeros(2)
    LOOPS.call("merge_requantize", _flat(q), old, _flat_terms(terms), n, k, bm, bn, width, _flat(out), inv, *work, norms)
    return float(norms[0]), float(norms[1])


def block_amax(x: np.ndarray, bm: int, bn: int, out: np.ndarray) -> None:
    """``out[a, b] = max |x|`` over block (a, b); ``x`` and ``out`` float32 viewed as int32, ``out`` starting at 0."""
    if x.size:
        LOOPS.call("block_amax", x, bm, bn, out, np.empty(x.shape[1], np.int32))


def scales(amax: np.ndarray, scale: np.ndarray, inv: np.ndarray) -> None:
    """``scale = 448 / amax`` (1 where amax is 0 or NaN), ``inv = 1 / scale``: ``Fp8Quantize``'s rule for F32 scales."""
    LOOPS.call("scales", amax, scale, inv)


def requantize(
    x: np.ndarray, q: np.ndarray, old: np.ndarray, scale: np.ndarray, inv: np.ndarray, bm: int, bn: int, out: np.ndarray
) -> tuple[float, float]:
    """Rows ``x`` stored as e4m3 bytes ``out`` with multipliers ``scale`` (inverses ``inv``, as stored); returns
    (‖Q(x) − W‖², ‖x − W‖²), W = float(q) · old the base rows."""
    if not x.size:
        return 0.0, 0.0
    norms = np.zeros(2)
    LOOPS.call("requantize", x, q, old, scale, inv, bm, bn, out, np.empty(6 * x.shape[1], np.float32), norms)
    return float(norms[0]), float(norms[1])


def _flat(a: np.ndarray) -> np.ndarray:
    """``a`` as one row, the same memory (a copy would leave an output unwritten)."""
    if not a.flags.c_contiguous:
        raise TypeError(f"expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")
    return a.reshape(-1)


def _flat_terms(terms: Terms) -> Terms:
    B, A, offsets, factors = terms
    return _flat(B), _flat(A), offsets, factors


def load() -> None:
    """Link the loops now (or load them through numba, building their image), rather than in the first row block
    that needs them."""
    LOOPS.load()
