"""AWQ linear weights in the GEMM layout (AutoAWQ / llm-compressor, ``quant_method: "awq"``), read only.

A linear ``q_proj`` of logical weight ``(out, in)`` is stored as:

- ``q_proj.qweight``: int32 ``(in, out / 8)``; packed along the *output* dim, eight 4-bit codes a
  word, field ``k`` (bits ``4k..4k+3``) holding column ``8 c + AWQ_ORDER[k]`` of word column ``c``;
- ``q_proj.qzeros``: int32 ``(in / group_size, out / 8)``, packed the same way;
- ``q_proj.scales``: float16 ``(in / group_size, out)``.

``W[o, i] = (q[i, o] - z[i // group_size, o]) * scales[i // group_size, o]`` (AutoAWQ 0.2.9
``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear`` packs with ``order_map = [0, 2, 4, 6,
1, 3, 5, 7]``; ``awq/utils/packing_utils.py`` ``dequantize_gemm`` reads it back).  As for GPTQ the
float32 product of a small integer and a float16 scale is exact.  Other AWQ layouts (GEMV,
exllama, marlin) are refused by the codec.
"""

from __future__ import annotations

import torch

from .gptq import unpack

BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""The output column (within its word's eight) that each 4-bit field holds, field 0 first."""


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``(n, m)`` -> 4-bit codes ``(n, 8 m)`` in column order (the AWQ field order undone)."""
    fields = unpack(packed, BITS, 1).reshape(packed.shape[0], packed.shape[1], 8)  # field order
    columns = torch.empty_like(fields)
    columns[..., list(AWQ_ORDER)] = fields  # field k is column AWQ_ORDER[k]
    return columns.reshape(packed.shape[0], -1)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    group_size: int,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logical weight rows ``rows`` (output features; all for None) as float32 ``(r1 - r0, in)``."""
    q = unpack_columns(qweight)  # (in, out)
    r0, r1 = rows if rows is not None else (0, q.shape[1])
    size = group_size if group_size > 0 else q.shape[0]
    z = unpack_columns(qzeros)[:, r0:r1].repeat_interleave(size, dim=0)[: q.shape[0]]
    s = scales[:, r0:r1].to(torch.float32).repeat_interleave(size, dim=0)[: q.shape[0]]
    return ((q[:, r0:r1] - z).to(torch.float32) * s).transpose(0, 1).contiguous()
