"""GPTQ linear weights (AutoGPTQ / GPTQModel / optimum checkpoints, ``quant_method: "gptq"``), read only.

A linear ``q_proj`` of logical weight ``(out, in)`` is stored as:

- ``q_proj.qweight``: int32 ``(in * bits / 32, out)``; packed along the *input* dim, input row
  ``i`` of column ``o`` in word ``i // (32 / bits)`` at bit ``bits * (i % (32 / bits))``;
- ``q_proj.qzeros``: int32 ``(groups, out * bits / 32)``; packed the same way along the *output* dim;
- ``q_proj.scales``: float16 ``(groups, out)``;
- ``q_proj.g_idx``: int32 ``(in,)``, the group of each input row (``i // group_size`` unless
  ``desc_act`` reordered them); absent in some checkpoints, then ``i // group_size``.

``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``.  The original AutoGPTQ
format (``checkpoint_format: "gptq"``, the default) stores each zero point minus one and adds the
one back when reading, without wrapping (AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py``;
GPTQModel ``nn_modules/qlinear/__init__.py`` ``dequantize_weight`` for ``gptq_v2``, which stores
it as is).  ``(q - z)`` is an integer below 2**9 and the scale a float16, so the float32 product
is exact: the float16 result those packages compute is this value rounded to float16.

The codes come from calibration (GPTQ's Hessian-ordered rounding), so nothing here requantizes.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)
"""Widths that pack evenly into int32 words (3-bit GPTQ straddles words and is refused)."""


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their ``32 / bits`` unsigned fields each, little end first, spread along ``dim``."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    words = packed.to(torch.int32).unsqueeze(dim + 1)  # (..., n, 1, ...)
    shape = [1] * words.dim()
    shape[dim + 1] = per_word
    fields = (words >> shifts.view(shape)) & ((1 << bits) - 1)  # arithmetic shift, then masked: unsigned
    size = list(packed.shape)
    size[dim] *= per_word
    return fields.reshape(size)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    zero_offset: int,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logical weight rows ``rows`` (output features; all for None) as float32 ``(r1 - r0, in)``.

    ``zero_offset`` is 1 for ``checkpoint_format "gptq"`` and 0 for ``"gptq_v2"``; ``group_size``
    -1 means one group over all inputs (used only when ``g_idx`` is None).
    """
    if bits not in BITS:
        raise ValueError(f"GPTQ with {bits} bits is not supported (only {', '.join(map(str, BITS))})")
    r0, r1 = rows if rows is not None else (0, qweight.shape[1])
    q = unpack(qweight[:, r0:r1], bits, 0)  # (in, r1 - r0)
    inputs = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(inputs, dtype=torch.int64) // (group_size if group_size > 0 else inputs)
    groups = g_idx.to(torch.int64)
    z = unpack(qzeros, bits, 1)[:, r0:r1] + zero_offset  # (groups, r1 - r0)
    s = scales[:, r0:r1].to(torch.float32)
    return ((q - z[groups]).to(torch.float32) * s[groups]).transpose(0, 1).contiguous()
