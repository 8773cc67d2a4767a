"""compressed-tensors FP8 weights (vLLM's FP8 checkpoints): one ``weight_scale`` per tensor or per output channel.

``quantization_config.quant_method == "compressed-tensors"`` with ``format`` "float-quantized" or
"naive-quantized" (or no config: the tensors decide).  A weight ``W`` (N, K) is stored as
``q_proj.weight`` (float8_e4m3fn) and ``q_proj.weight_scale``, shape (1,) or () per tensor, (N, 1)
per channel; static activation scales (``input_scale``) ride along untouched.  As compressed-tensors
0.20.1 ``quantization/lifecycle/forward.py`` ``dequantize`` computes it, ``W = q.to(scale.dtype) · scale``
in the scale's dtype (then float32 here).

Requantization is compressed-tensors' symmetric rule (``quantization/utils/helpers.py``
``calculate_qparams`` then ``quantize``): per channel (or tensor) ``a = amax|W|``, ``scale = a / 448``
in float32 (an exact zero becomes float32 eps), stored in the checkpoint's scale dtype, and
``q = clamp(W / scale, -448, 448)`` cast to e4m3.  Group and block strategies (scale grids other
than those two shapes) and asymmetric zero points are not claimed, so the planner refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import Problem
from ..tensorfile import TensorInfo
from .base import Codec, Parts, QuantTensor, Rows
from .e4m3 import FP8, FP8_MAX, decode

FORMATS = (None, "float-quantized", "naive-quantized")
SCALE_DTYPES = ("F32", "BF16", "F16")
_SCALE = ".weight_scale"


class Fp8Tensor(Codec):
    name = "fp8-tensor"
    methods = ("compressed-tensors",)
    requantizable = True

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        if qconfig and qconfig.get("format") not in FORMATS:
            return {}, []  # pack-quantized, nvfp4 ...: another codec's or none
        found: dict[str, QuantTensor] = {}
        problems: list[Problem] = []
        for name, scale in tensors.items():
            if not name.endswith(_SCALE):
                continue
            key = name.removesuffix("_scale")
            q, why = _claim(key, tensors, scale)
            if q is not None:
                found[key] = q
            elif why:
                problems.append(Problem("base-quant-malformed", key, f"compressed-tensors FP8 weight {key}: {why}"))
        return found, problems

    def row_align(self, q: QuantTensor) -> int:
        return q.shape[0] if q.params["per_tensor"] else 1

    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        if role == "weight" or (role == "weight_scale" and not q.params["per_tensor"]):
            return rows
        return 0, int(q.params["numel"][role])

    def rewritten(self, q: QuantTensor) -> tuple[str, ...]:
        return ("weight_scale",)

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        r0, r1 = rows or self.all_rows(q)
        scale = parts["weight_scale"]
        scale = scale.reshape(-1) if q.params["per_tensor"] else scale[r0:r1]
        return (decode(parts["weight"][r0:r1], scale.dtype) * scale).to(torch.float32)

    def quantize(self, q: QuantTensor, w: torch.Tensor, rows: Rows, like: Parts) -> dict[str, torch.Tensor]:
        stored = like["weight_scale"]
        amax = w.abs().amax() if q.params["per_tensor"] else w.abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0  # compressed-tensors: max(|min|, |max|) / (bit_range / 2), bit_range = 896
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale).to(stored.dtype)
        weight = (w / scale.to(torch.float32)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return {"weight": weight, "weight_scale": scale.reshape(stored.shape) if q.params["per_tensor"] else scale}


def _claim(key: str, tensors: Mapping[str, TensorInfo], scale: TensorInfo) -> tuple[QuantTensor | None, str]:
    """The QuantTensor of ``key`` with its ``weight_scale``, or None and why (empty: not this format)."""
    weight = tensors.get(key)
    if weight is None:
        return None, f"{scale.name} has no {key} beside it"
    if weight.dtype != "F8_E4M3":
        return None, ""  # an int8 or packed weight: not FP8, left to another codec (or refused as unhandled)
    if scale.dtype not in SCALE_DTYPES:
        return None, f"{scale.name} is stored as {scale.dtype} (expected one of {', '.join(SCALE_DTYPES)})"
    if len(weight.shape) != 2:
        return None, f"has shape {list(weight.shape)}; per-tensor and per-channel scales need a 2-D weight"
    if key.removesuffix("weight") + "weight_zero_point" in tensors:
        return None, "has a weight_zero_point (asymmetric FP8), which loratools does not handle"
    n = weight.shape[0]
    per_tensor = math.prod(scale.shape) == 1 and len(scale.shape) <= 1
    if not per_tensor and tuple(scale.shape) != (n, 1):
        return None, f"{scale.name} is {list(scale.shape)}: only per-tensor [1] and per-channel [{n}, 1] scales are handled"
    parts = {"weight": key, "weight_scale": scale.name}
    numel = {"weight_scale": math.prod(scale.shape)}
    act = key.removesuffix("weight") + "input_scale"
    if act in tensors:
        parts["input_scale"] = act
        numel["input_scale"] = math.prod(tensors[act].shape)
    kind = "per-tensor" if per_tensor else "per-channel"
    label = f"compressed-tensors FP8 e4m3, {kind} weight_scale ({scale.dtype})"
    params = {"per_tensor": per_tensor, "numel": numel, "scale_dtype": scale.dtype}
    return QuantTensor(key, "fp8-tensor", weight.shape, parts, "weight", label, params), ""


CODEC = Fp8Tensor()
