"""MXFP4 (OCP microscaling FP4), as gpt-oss stores its MoE experts.

A fused expert parameter ``experts.gate_up_proj`` (logical shape ``(E, in, out)``, the layout
transformers' ``GptOssExperts`` holds) is stored as two tensors:

- ``experts.gate_up_proj_blocks``: uint8 ``(E, out, in // 32, 16)``; each byte packs two e2m1
  codes, the element at even position in the low nibble, the odd one in the high nibble;
- ``experts.gate_up_proj_scales``: uint8 ``(E, out, in // 32)``; one e8m0 exponent (bias 127) per
  block of 32 consecutive inputs.

An e2m1 code is ``sign << 3 | magnitude`` with magnitudes ``FP4_GRID``; the value of element ``k``
of stored row ``r`` is ``FP4_GRID[code] * 2 ** (scales[r, k // 32] - 127)``.  Stored rows are the
logical tensor's *output* columns, so the logical tensor is the transposition of the stored rows
(transformers 5.24 ``integrations/mxfp4.py`` ``convert_moe_packed_tensors`` returns
``out.transpose(1, 2)``).  Blocks are always whole: the stored shape fixes ``in = 32 * G``, so the
format has no ragged edge block.

Quantizing back follows the rule transformers uses to write MXFP4 (``quantize_to_mxfp4`` calls
triton_kernels ``numerics_details/mxfp.py`` ``downcast_to_mxfp_torch`` with its default
``DequantScaleRoundingMode.ROUND_UP``): the block's scale is the smallest power of two not below
``amax / 6`` (computed in float32; ``2 ** -126`` at least, exponent byte 0 only for an all-zero
block), so the block maximum never clips; each element ``x / scale`` is rounded to the nearest e2m1
magnitude, ties to the even code, saturating at 6; the sign bit is ``x``'s own (so ``-0.1`` of a
large block is stored as negative zero, as triton_kernels does).  transformers first rounds the
weight to bfloat16; we quantize the float32 sum as is (no double rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import Problem
from ..tensorfile import TensorInfo
from .base import Codec, Parts, QuantError, QuantTensor, Rows

BLOCK = 32
"""Elements per shared exponent (OCP MX v1.0)."""
BIAS = 127
"""e8m0 exponent bias: scale byte ``b`` is ``2 ** (b - 127)``; 255 is NaN."""
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""e2m1 magnitudes by code 0..7 (1 sign, 2 exponent, 1 mantissa bit, no inf or NaN)."""

# RNE decision points between neighbouring magnitudes.  A tie goes to the even code (mantissa bit
# 0): 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0; above 5
# saturates to 6.  ``torch.bucketize`` puts a value equal to a boundary in the lower bucket, so a
# midpoint whose tie rounds up is replaced by the float32 just below it.
_TIES_UP = (0.75, 1.75, 3.5)
_BOUNDARIES = tuple(
    torch.nextafter(torch.tensor(m), torch.tensor(0.0)).item() if m in _TIES_UP else m for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
)


def _pair_lut(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two values of every byte, low nibble first (one gather per byte)."""
    grid = torch.tensor(FP4_GRID, dtype=torch.float32, device=device)
    codes = torch.cat([grid, -grid])  # code 8..15: the same magnitudes, negative (8 is -0.0)
    byte = torch.arange(256, device=device)
    return torch.stack([codes[byte & 0x0F], codes[byte >> 4]], dim=-1)


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Stored rows as float32: ``blocks (..., G, 16)`` uint8 and ``scales (..., G)`` uint8 -> ``(..., 32 G)``.

    The scaling equals ``torch.ldexp``, which transformers applies: exact, so a scale byte of 255
    (NaN in e8m0) gives inf for non-zero codes and keeps zeros, as the reference does; the codec
    refuses such blocks before they reach a merge.
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    values = torch.nn.functional.embedding(blocks.to(torch.int32), _pair_lut(blocks.device)).reshape(*scales.shape, -1)  # (..., G, 2B)
    # v * 2.0 ** e, the power taken once per block (torch.ldexp's own per-element pow is ~40x slower).
    # Byte 255 (e = 128, 2 ** 128 not a float32) scales by 2 ** 127 and then by 2: both steps are exact
    # or overflow to inf, so the result is ldexp's (0 stays 0), which is what the reference computes.
    exponents = scales.to(torch.int32).unsqueeze(-1) - BIAS
    top = exponents > BIAS
    values.mul_(torch.pow(2.0, exponents - top.to(torch.int32)))
    if bool(top.any()):
        values.mul_(torch.where(top, 2.0, 1.0))
    return values.reshape(*scales.shape[:-1], -1)


def dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The logical expert tensor ``(E, in, out)`` float32 from stored ``(E, out, G, 16)`` / ``(E, out, G)``."""
    return dequantize_rows(blocks, scales).transpose(1, 2).contiguous()


def exponent_bytes(amax: torch.Tensor) -> torch.Tensor:
    """The e8m0 byte of each block from its float32 ``amax``: ``ceil(log2(amax / 6))`` biased, at least 1; 0 for 0."""
    ratio = amax.to(torch.float32) / FP4_GRID[-1]
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent)
    biased = (ceil_log2 + BIAS).clamp(1, 2 * BIAS)
    return torch.where(amax == 0, torch.zeros_like(biased), biased).to(torch.uint8)


def e2m1_magnitudes(scaled: torch.Tensor) -> torch.Tensor:
    """e2m1 magnitude codes 0..7 (round to nearest, ties to even, saturating) of float32 ``|x| / scale``."""
    boundaries = torch.tensor(_BOUNDARIES, dtype=torch.float32, device=scaled.device)
    return torch.bucketize(scaled, boundaries, out_int32=True).to(torch.uint8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows ``(..., K)`` (K a multiple of 32, finite) -> ``blocks (..., K/32, 16)``, ``scales (..., K/32)``.

    The inverse layout of :func:`dequantize_rows`, with fresh scales by the rule in the module
    docstring.
    """
    if x.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 rows must be whole {BLOCK}-element blocks, got {x.shape[-1]} elements")
    groups = x.to(torch.float32).contiguous().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    magnitude = groups.abs()
    scales = exponent_bytes(magnitude.amax(dim=-1))
    # 1 / scale exactly (a power of two; 2 ** -127 is a float32 subnormal); 0 for an all-zero block
    inverse = torch.where(scales == 0, 0.0, torch.ldexp(torch.ones_like(magnitude[..., 0]), BIAS - scales.to(torch.int32)))
    codes = e2m1_magnitudes(magnitude.mul_(inverse.unsqueeze(-1)))
    codes |= torch.signbit(groups).to(torch.uint8) << 3  # the sign of x itself: -0.1 of a large block is -0.0
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), scales


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical ``(E, in, out)`` float32 -> stored ``blocks (E, out, in/32, 16)``, ``scales (E, out, in/32)``."""
    return quantize_rows(w.transpose(1, 2))


class Mxfp4(Codec):
    """gpt-oss expert parameters stored as ``<name>_blocks`` / ``<name>_scales``; rows are experts."""

    name = "mxfp4"
    methods = ("mxfp4",)
    requantizable = True

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        found: dict[str, QuantTensor] = {}
        problems: list[Problem] = []
        for name, blocks in tensors.items():
            if not name.endswith("_blocks"):
                continue
            key = name.removesuffix("_blocks")
            q, why = _claim(key, blocks, tensors.get(f"{key}_scales"))
            if q is not None:
                found[key] = q
            else:
                problems.append(Problem("base-quant-malformed", key, f"MXFP4 parameter {key}: {why}"))
        for name in tensors:
            key = name.removesuffix("_scales")
            if name.endswith("_scales") and f"{key}_blocks" not in tensors:
                problems.append(Problem("base-quant-malformed", key, f"MXFP4 parameter {key}: {name} has no {key}_blocks beside it"))
        return found, problems

    def row_align(self, q: QuantTensor) -> int:
        return 1

    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        return rows  # one row per expert in every part

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        r0, r1 = rows or self.all_rows(q)
        scales = parts["scales"][r0:r1]
        if bool((scales == 2 * BIAS + 1).any()):
            raise QuantError("holds an MXFP4 scale of 255 (NaN in e8m0); refusing to merge into a NaN block", key=q.parts["scales"])
        return dequantize_experts(parts["blocks"][r0:r1], scales)

    def quantize(self, q: QuantTensor, w: torch.Tensor, rows: Rows, like: Parts) -> dict[str, torch.Tensor]:
        if not bool(torch.isfinite(w).all()):
            raise QuantError("merged weight is not finite; MXFP4 cannot store it", key=q.key)
        blocks, scales = quantize_experts(w)
        return {"blocks": blocks, "scales": scales}


def _claim(key: str, blocks: TensorInfo, scales: TensorInfo | None) -> tuple[QuantTensor | None, str]:
    """The QuantTensor of expert parameter ``key``, or None and why its parts do not fit the format."""
    if scales is None:
        return None, f"{blocks.name} has no {key}_scales beside it"
    if blocks.dtype != "U8" or scales.dtype != "U8":
        return None, f"{blocks.name} is {blocks.dtype} and {scales.name} {scales.dtype} (both must be U8)"
    if len(blocks.shape) != 4 or blocks.shape[-1] != BLOCK // 2:
        return None, f"{blocks.name} is {list(blocks.shape)}; expected (experts, out, in/32, 16)"
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        return None, f"{scales.name} is {list(scales.shape)} but {blocks.name} {list(blocks.shape)} needs {list(blocks.shape[:-1])}"
    experts, out, groups, _ = blocks.shape
    parts = {"blocks": blocks.name, "scales": scales.name}
    label = "MXFP4 (e2m1, e8m0 scales per 32 inputs)"
    return QuantTensor(key, "mxfp4", (experts, groups * BLOCK, out), parts, "blocks", label, {"groups": groups}), ""


CODEC = Mxfp4()
