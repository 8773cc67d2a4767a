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

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import Problem
from ..tensorfile import TensorInfo
from .base import Parts, QuantTensor, Rows
from .gptq import Packed, claim_qweights, unpack

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
    r0, r1 = rows if rows is not None else (0, qweight.shape[1] * 8)
    c0, c1 = r0 // 8, -(-r1 // 8)  # only the words that hold these output columns are unpacked
    q = unpack_columns(qweight[:, c0:c1])[:, r0 - 8 * c0 : r1 - 8 * c0]  # (in, r1 - r0)
    inputs = q.shape[0]
    size = group_size if group_size > 0 else inputs
    z = unpack_columns(qzeros[:, c0:c1])[:, r0 - 8 * c0 : r1 - 8 * c0].repeat_interleave(size, dim=0)[:inputs]
    s = scales[:, r0:r1].to(torch.float32).repeat_interleave(size, dim=0)[:inputs]
    return ((q - z).to(torch.float32) * s).transpose(0, 1).contiguous()


class Awq(Packed):
    """AWQ GEMM ``<module>.qweight``/``qzeros``/``scales``, logical ``<module>.weight``; rows are outputs."""

    name = "awq"
    methods = ("awq",)

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        if not qconfig or qconfig.get("quant_method") != "awq":
            return {}, []  # the group size and layout live only in quantization_config
        why = _unsupported(qconfig)
        group_size = qconfig.get("group_size", 128)
        return claim_qweights(tensors, "AWQ", lambda module: (None, why) if why else _claim(module, tensors, int(group_size)))

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        return dequantize(parts["qweight"], parts["qzeros"], parts["scales"], group_size=q.params["group_size"], rows=rows)


def _unsupported(qconfig: Mapping[str, Any]) -> str:
    """Why this AWQ quantization_config is not the 4-bit GEMM layout read here ("" when it is)."""
    # transformers 5.24 utils/quantization_config.py AwqConfig: ``format``, the legacy ``version``
    # winning when set; backend "llm-awq" means the llm-awq layout
    legacy = qconfig.get("version")
    version = str(legacy if legacy is not None else qconfig.get("format", "gemm")).lower()
    if qconfig.get("backend") == "llm-awq":
        version = "llm-awq"
    bits, group_size = qconfig.get("bits", 4), qconfig.get("group_size", 128)
    if version != "gemm":
        return f"AWQ format {version!r} is not supported (only gemm)"
    if bits != BITS:
        return f"AWQ with {bits!r} bits is not supported (only 4)"
    if qconfig.get("zero_point", True) is not True:
        return "AWQ without zero points is not supported"
    if type(group_size) is not int or not (group_size == -1 or group_size > 0):
        return f"quantization_config group_size {group_size!r} is not -1 or a positive integer"
    return ""


def _claim(module: str, tensors: Mapping[str, TensorInfo], group_size: int) -> tuple[QuantTensor | None, str]:
    qweight, qzeros, scales = (tensors.get(f"{module}.{part}") for part in ("qweight", "qzeros", "scales"))
    if qweight is None or qzeros is None or scales is None:
        return None, f"{module}.qweight needs {module}.qzeros and {module}.scales beside it"
    if qweight.dtype != "I32" or qzeros.dtype != "I32" or scales.dtype not in ("F16", "BF16", "F32"):
        return None, f"parts are {qweight.dtype}/{qzeros.dtype}/{scales.dtype} (expected I32/I32 and a float scales)"
    if len(qweight.shape) != 2 or len(scales.shape) != 2 or len(qzeros.shape) != 2:
        return None, "qweight, qzeros and scales must be 2-D"
    inputs, outputs = qweight.shape[0], qweight.shape[1] * 8
    groups = 1 if group_size == -1 else -(-inputs // group_size)
    if scales.shape != (groups, outputs) or qzeros.shape != (groups, outputs // 8):
        return None, (
            f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)} do not fit "
            f"4-bit AWQ GEMM of a {outputs}x{inputs} weight in {groups} group(s)"
        )
    parts = {"qweight": qweight.name, "qzeros": qzeros.name, "scales": scales.name}
    rows = {role: tensors[k].shape[0] for role, k in parts.items()}
    label = f"AWQ 4-bit GEMM, group size {group_size}"
    params = {"group_size": group_size, "rows": rows}
    return QuantTensor(f"{module}.weight", "awq", (outputs, inputs), parts, "qweight", label, params), ""


CODEC = Awq()
