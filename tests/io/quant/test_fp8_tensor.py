"""compressed-tensors FP8: dequantization equals compressed-tensors' own ``dequantize`` bit for bit;
requantization equals its ``calculate_qparams`` + ``quantize``, per tensor and per channel."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from loratools.io.quant.fp8_tensor import CODEC
from loratools.io.tensorfile import DTYPE_NAMES, TensorInfo

QCONFIG = {"quant_method": "compressed-tensors", "format": "float-quantized"}


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())


def _claim(**parts: torch.Tensor):
    tensors = {f"m.{role}": _info(f"m.{role}", t) for role, t in parts.items()}
    found, problems = CODEC.claims(QCONFIG, tensors)
    assert not problems, problems
    return found["m.weight"]


def _args(strategy: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)


def _reference(w: torch.Tensor, strategy: str, scale_dtype: torch.dtype):
    """compressed-tensors' own FP8 compression of float32 ``w``, its scale stored in ``scale_dtype``."""
    dims = {} if strategy == "tensor" else {"dim": 1, "keepdim": True}
    lo, hi = (w.amin(**dims), w.amax(**dims))
    scale, zp = calculate_qparams(lo, hi, _args(strategy))
    scale = scale.to(scale_dtype)
    return quantize(w, scale, zp, _args(strategy), dtype=torch.float8_e4m3fn), scale


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_and_quantize_equal_compressed_tensors(strategy, scale_dtype):
    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3] = 0.0  # an all-zero channel takes the eps scale
    weight, scale = _reference(w, strategy, scale_dtype)
    q = _claim(weight=weight, weight_scale=scale)
    assert q.params["per_tensor"] == (strategy == "tensor")
    parts = {"weight": weight, "weight_scale": scale}
    want = dequantize(weight, scale, None, _args(strategy)).to(torch.float32)
    assert torch.equal(CODEC.dequantize(q, parts), want)
    got = CODEC.quantize(q, w, CODEC.all_rows(q), parts)
    assert torch.equal(got["weight"].view(torch.uint8), weight.view(torch.uint8))
    assert got["weight_scale"].dtype == scale_dtype and torch.equal(got["weight_scale"], scale)


def test_per_channel_row_blocks():
    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(3))
    weight, scale = _reference(w, "channel", torch.float32)
    q = _claim(weight=weight, weight_scale=scale, input_scale=torch.ones(1))
    parts = {"weight": weight, "weight_scale": scale, "input_scale": torch.ones(1)}
    assert q.companions == {"weight_scale": "m.weight_scale", "input_scale": "m.input_scale"}
    assert CODEC.row_align(q) == 1
    blocks = [CODEC.dequantize(q, parts, (r, min(37, r + 8))) for r in range(0, 37, 8)]
    assert torch.equal(torch.cat(blocks), CODEC.dequantize(q, parts))
    out = [CODEC.quantize(q, w[r : r + 8], (r, min(37, r + 8)), parts) for r in range(0, 37, 8)]
    assert torch.equal(torch.cat([o["weight_scale"] for o in out]), scale)


def test_hand_checked_per_tensor():
    # amax 4.48 -> scale 0.01; q = W / 0.01 = [100, -448] rounded to e4m3: 100 -> 96 (3 mantissa bits: 96, 104)
    w = torch.tensor([[1.0, -4.48]])
    q = _claim(weight=w.to(torch.float8_e4m3fn), weight_scale=torch.ones(1))
    out = CODEC.quantize(q, w, (0, 1), {"weight_scale": torch.ones(1)})
    assert out["weight_scale"].tolist() == [pytest.approx(0.01)]
    assert out["weight"].float().tolist() == [[96.0, -448.0]]


def test_other_strategies_and_formats_are_not_claimed():
    weight = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    group = {"m.weight": _info("m.weight", weight), "m.weight_scale": _info("m.weight_scale", torch.ones(8, 2))}
    found, problems = CODEC.claims(QCONFIG, group)
    assert not found and "only per-tensor [1] and per-channel [8, 1]" in problems[0].message
    packed = {**QCONFIG, "format": "pack-quantized"}
    assert CODEC.claims(packed, group) == ({}, [])
    int8 = {"m.weight": _info("m.weight", weight.view(torch.int8)), "m.weight_scale": _info("m.weight_scale", torch.ones(8, 1))}
    assert CODEC.claims(QCONFIG, int8) == ({}, [])
