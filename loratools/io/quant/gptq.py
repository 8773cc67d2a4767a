"""GPTQ linear weights (AutoGPTQ / GPTQModel / optimum checkpoints, ``quant_method: "gptq"``), read only.

A linear ``q_proj`` of logical weight ``(out, in)`` is stored as:

- ``q_proj.qweight``: int32 ``(in * bits / 32, out)``; packed along the *input* dim, input row
  ``i`` of column ``o`` in word ``i // (32 / bits)`` at bit ``bits * (i % (32 / bits))``;
- ``q_proj.qzeros``: int32 ``(groups, out * bits / 32)``; packed the same way along the *output* dim;
- ``q_proj.scales``: float16 ``(groups, out)``;
- ``q_proj.g_idx``: int32 ``(in,)``, the group of each input row (``i // group_size`` unless
  ``desc_act`` reordered them); absent in some checkpoints, then ``i // group_size``.

``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``.  The original AutoGPTQ
format (``format`` / legacy ``checkpoint_format`` ``"gptq"``, the default) stores each zero point minus one and adds the
one back when reading, without wrapping (AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py``;
GPTQModel ``nn_modules/qlinear/__init__.py`` ``dequantize_weight`` for ``gptq_v2``, which stores
it as is).  ``(q - z)`` is an integer below 2**9 and the scale a float16, so the float32 product
is exact: the float16 result those packages compute is this value rounded to float16.

The codes come from calibration (GPTQ's Hessian-ordered rounding), so nothing here requantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...errors import Problem
from ..tensorfile import TensorInfo
from .base import Codec, Parts, QuantError, QuantTensor, Rows

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

    ``zero_offset`` is 1 for format ``"gptq"`` and 0 for ``"gptq_v2"``; ``group_size``
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
    per = 32 // bits
    c0 = r0 // per  # only the zero-point words that hold these output columns
    z = unpack(qzeros[:, c0 : -(-r1 // per)], bits, 1)[:, r0 - per * c0 : r1 - per * c0] + zero_offset  # (groups, r1 - r0)
    s = scales[:, r0:r1].to(torch.float32)
    return ((q - z[groups]).to(torch.float32) * s[groups]).transpose(0, 1).contiguous()


FORMATS = {"gptq": 1, "gptq_v2": 0}
"""GPTQ ``format`` -> the zero-point offset added when reading."""


class Packed(Codec):
    """Read-only ``<module>.qweight`` formats (GPTQ, AWQ): int32 words packed along inputs, rows are outputs."""

    requantizable = False

    def row_align(self, q: QuantTensor) -> int:
        return 1

    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        return 0, int(q.params["rows"][role])  # packed along inputs: every output row needs every stored row


def claim_qweights(
    tensors: Mapping[str, TensorInfo], label: str, claim: Callable[[str], tuple[QuantTensor | None, str]]
) -> tuple[dict[str, QuantTensor], list[Problem]]:
    """Each ``<module>.qweight`` as the parameter ``<module>.weight``: ``claim(module)``'s tensor, or a problem with its reason."""
    found: dict[str, QuantTensor] = {}
    problems: list[Problem] = []
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        module = name.removesuffix(".qweight")
        key = f"{module}.weight"
        q, reason = claim(module)
        if q is not None:
            found[key] = q
        else:
            problems.append(Problem("base-quant-malformed", key, f"{label} weight {key}: {reason}"))
    return found, problems


class Gptq(Packed):
    """GPTQ ``<module>.qweight``/``qzeros``/``scales``/``g_idx``, logical ``<module>.weight``; rows are outputs."""

    name = "gptq"
    methods = ("gptq",)

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        if not qconfig or qconfig.get("quant_method") != "gptq" or qconfig.get("bits") is None:
            return {}, []  # the bits and zero-point convention live only in quantization_config: unhandled without
        settings, why = _settings(qconfig)
        return claim_qweights(
            tensors,
            "GPTQ",
            lambda module: _claim(module, tensors[f"{module}.qweight"], tensors, settings) if settings is not None else (None, why),
        )

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        g_idx = parts.get("g_idx")
        if g_idx is not None and g_idx.numel() and not (0 <= int(g_idx.min()) and int(g_idx.max()) < q.params["groups"]):
            raise QuantError(f"g_idx holds groups outside 0..{q.params['groups'] - 1}", key=q.parts["g_idx"])
        return dequantize(
            parts["qweight"],
            parts["qzeros"],
            parts["scales"],
            g_idx,
            bits=q.params["bits"],
            group_size=q.params["group_size"],
            zero_offset=q.params["zero_offset"],
            rows=rows,
        )


def _settings(qconfig: Mapping[str, Any]) -> tuple[dict[str, int] | None, str]:
    bits, group_size = qconfig.get("bits"), qconfig.get("group_size", -1)
    # transformers 5.24 utils/quantization_config.py GPTQConfig: ``format``, the legacy
    # ``checkpoint_format`` winning when set; default "gptq"
    legacy, fmt = qconfig.get("checkpoint_format"), qconfig.get("format", "gptq")
    fmt = legacy if legacy is not None else fmt
    fmt = fmt.lower() if isinstance(fmt, str) else fmt
    if type(bits) is not int or bits not in BITS:
        return None, f"quantization_config bits {bits!r} is not supported (only {', '.join(map(str, BITS))})"
    if type(group_size) is not int or not (group_size == -1 or group_size > 0):
        return None, f"quantization_config group_size {group_size!r} is not -1 or a positive integer"
    if fmt not in FORMATS:
        return None, f"quantization_config format {fmt!r} is not supported (only {', '.join(FORMATS)})"
    return {"bits": bits, "group_size": group_size, "zero_offset": FORMATS[fmt]}, ""


def _claim(module: str, qweight: TensorInfo, tensors: Mapping[str, TensorInfo], settings: dict[str, int]) -> tuple[QuantTensor | None, str]:
    """The QuantTensor of ``module``'s weight from its parts' headers, or None and why they do not fit."""
    bits, per = settings["bits"], 32 // settings["bits"]
    qzeros, scales, g_idx = (tensors.get(f"{module}.{part}") for part in ("qzeros", "scales", "g_idx"))
    if qzeros is None or scales is None:
        return None, f"{module}.qweight needs {module}.qzeros and {module}.scales beside it"
    if qweight.dtype != "I32" or qzeros.dtype != "I32" or scales.dtype not in ("F16", "BF16", "F32"):
        return None, f"parts are {qweight.dtype}/{qzeros.dtype}/{scales.dtype} (expected I32/I32 and a float scales)"
    if len(qweight.shape) != 2 or len(scales.shape) != 2 or len(qzeros.shape) != 2:
        return None, "qweight, qzeros and scales must be 2-D"
    inputs, outputs = qweight.shape[0] * per, qweight.shape[1]
    groups = scales.shape[0]
    want_groups = 1 if settings["group_size"] == -1 else -(-inputs // settings["group_size"])
    if scales.shape != (groups, outputs) or qzeros.shape != (groups, outputs // per) or outputs % per or groups != want_groups:
        return None, (
            f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)} do not fit "
            f"{bits}-bit GPTQ of a {outputs}x{inputs} weight in {want_groups} group(s)"
        )
    parts = {"qweight": qweight.name, "qzeros": qzeros.name, "scales": scales.name}
    if g_idx is not None:
        if g_idx.dtype not in ("I32", "I64") or g_idx.shape != (inputs,):
            return None, f"g_idx is {g_idx.dtype} {list(g_idx.shape)} (expected I32 [{inputs}])"
        parts["g_idx"] = g_idx.name
    rows = {role: tensors[k].shape[0] for role, k in parts.items()}
    label = f"GPTQ {bits}-bit, group size {settings['group_size']}"
    params = {**settings, "groups": groups, "rows": rows}
    return QuantTensor(f"{module}.weight", "gptq", (outputs, inputs), parts, "qweight", label, params), ""


CODEC = Gptq()
