"""MXFP4 math: dequantization equals transformers' reference bit for bit; quantization follows the
ROUND_UP / round-to-nearest-even rule (reference written below from the rule's definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from loratools.io.quant import mxfp4
from loratools.io.quant.base import QuantError
from loratools.io.quant.registry import scan
from loratools.io.tensorfile import TensorInfo


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _random_parts(seed: int, experts: int, out: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (experts, out, groups), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize(("experts", "out", "groups"), [(1, 1, 1), (3, 5, 4), (2, 7, 3), (4, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers_reference(experts: int, out: int, groups: int, dtype: torch.dtype) -> None:
    blocks, scales = _random_parts(experts * 100 + out, experts, out, groups)
    scales.view(-1)[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)[: scales.numel()]  # both ends of e8m0
    ours = mxfp4.dequantize_experts(blocks, scales)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.dtype == torch.float32
    assert ours.shape == reference.shape == (experts, groups * 32, out)  # (E, in, out): transposed rows
    assert torch.equal(_bits(ours.to(dtype)), _bits(reference))


def test_every_code_and_scale_by_hand() -> None:
    # byte 0x21: low nibble 1 (+0.5) first, high nibble 2 (+1.0); 0xF8: -0.0 then -6.0
    blocks = torch.tensor([[[0x21, 0xF8] + [0] * 14]], dtype=torch.uint8)
    rows = mxfp4.dequantize_rows(blocks, torch.tensor([[129]], dtype=torch.uint8))  # scale 2**2
    assert rows[0, :4].tolist() == [2.0, 4.0, -0.0, -24.0]
    assert torch.signbit(rows[0, 2])
    tiny = mxfp4.dequantize_rows(torch.full((1, 16), 0x11, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8))
    assert tiny[0].item() == 2.0**-128  # 0.5 * 2**-127, a float32 subnormal


def test_quantize_by_hand() -> None:
    # amax 6 -> scale 2**0 (byte 127); ties go to the even code: 0.25->0, 0.75->1.0, 1.25->1.0,
    # 1.75->2.0, 2.5->2.0, 3.5->4.0, 5.0->4.0, 6.0->6.0
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] + [0.0] * 24])
    blocks, scales = mxfp4.quantize_rows(x)
    assert scales.tolist() == [[127]]
    assert blocks[0, 0, :4].tolist() == [0x20, 0x42, 0x64, 0x76]
    # amax 6.5 -> 6.5/6 rounds up to scale 2 (byte 128): 6.5/2 = 3.25 -> 3.0; -0.1/2 -> -0.0 (code 8)
    blocks, scales = mxfp4.quantize_rows(torch.tensor([[6.5, -0.1] + [0.0] * 30]))
    assert scales.tolist() == [[128]] and blocks[0, 0, 0].item() == 0x85
    # an all-zero block: byte 0, every code 0
    blocks, scales = mxfp4.quantize_rows(torch.zeros(1, 32))
    assert scales.tolist() == [[0]] and not blocks.any()


def _reference_quantize(row: np.ndarray) -> tuple[list[int], list[int]]:
    """The rule from its definition, one element at a time in Python floats.

    Scale: the least power of two 2**e >= float32(amax / 6), e >= -126 (triton_kernels
    numerics_details/mxfp.py, DequantScaleRoundingMode.ROUND_UP, which transformers 5.24
    integrations/mxfp4.py quantize_to_mxfp4 uses); byte e + 127, 0 for an all-zero block.  Element:
    the nearest e2m1 magnitude to |x| / 2**e, a tie to the even code, above 6 saturating; the sign
    bit of x.
    """
    codes: list[int] = []
    scales: list[int] = []
    for block in row.reshape(-1, 32):
        amax = float(np.abs(block).max())
        if amax == 0:
            scales.append(0)
            codes += [8 if math.copysign(1, float(v)) < 0 else 0 for v in block]
            continue
        ratio = float(np.float32(amax) / np.float32(6.0))
        e = max(math.ceil(math.log2(ratio)), -126)
        while 2.0**e < ratio:  # guard log2 rounding
            e += 1
        while e > -126 and 2.0 ** (e - 1) >= ratio:
            e -= 1
        scales.append(e + 127)
        for v in block:
            a = abs(float(v)) / 2.0**e
            best = min(range(8), key=lambda c: (abs(mxfp4.FP4_GRID[c] - a), c % 2))
            codes.append(best | (8 if math.copysign(1, float(v)) < 0 else 0))
    return codes, scales


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-120, 120),
    rows=st.integers(1, 3),
    groups=st.integers(1, 3),
)
def test_quantize_equals_rule_reference(seed: int, log_scale: float, rows: int, groups: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * 32, generator=g) * 2.0**log_scale
    x[0, :3] = torch.tensor([0.0, -0.0, x[0, 3].item() * 1e-9])  # zeros and an element far below its block
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # amax 6 * 2**k, then every midpoint
    x[-1, -8:] = ties * 2.0 ** round(log_scale)
    blocks, scales = mxfp4.quantize_rows(x)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(rows, -1)
    for r in range(rows):
        want_codes, want_scales = _reference_quantize(x[r].numpy())
        assert codes[r].tolist() == want_codes
        assert scales[r].tolist() == want_scales


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-100, 100))
def test_round_trip_within_the_format_bound(seed: int, log_scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 64, 3, generator=g) * 2.0**log_scale  # logical (E, in, out)
    blocks, scales = mxfp4.quantize_experts(w)
    assert blocks.shape == (2, 3, 2, 16) and scales.shape == (2, 3, 2)
    back = mxfp4.dequantize_experts(blocks, scales)
    # |x - Q(x)| <= max(s/4, |x|/4) for block scale s (grid steps 0.5 below 2, 1 below 4, 2 below 6)
    s = torch.ldexp(torch.ones(()), scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1).transpose(1, 2)
    bound = torch.maximum(s / 4, w.abs() / 4) * (1 + 2**-20)
    assert ((back - w).abs() <= bound).all()
    # dequantized values are a fixed point: requantizing them changes no value
    assert torch.equal(mxfp4.dequantize_experts(*mxfp4.quantize_experts(back)), back)


def test_requantized_sum_is_quantize_of_dequantized_plus_delta() -> None:
    g = torch.Generator().manual_seed(7)
    blocks, scales = mxfp4.quantize_experts(torch.randn(2, 64, 4, generator=g))
    delta = torch.randn(2, 64, 4, generator=g) * 0.05
    merged = mxfp4.dequantize_experts(blocks, scales) + delta
    new_blocks, new_scales = mxfp4.quantize_experts(merged)
    want_codes, want_scales = _reference_quantize(merged[1].transpose(0, 1).reshape(-1).numpy())
    codes = torch.stack([new_blocks & 0x0F, new_blocks >> 4], dim=-1)
    assert codes[1].reshape(-1).tolist() == want_codes
    assert new_scales[1].reshape(-1).tolist() == want_scales


def test_ragged_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="whole 32-element blocks"):
        mxfp4.quantize_rows(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize_rows(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, {torch.uint8: "U8", torch.float32: "F32"}[t.dtype], tuple(t.shape), 0, 0)


def test_codec_claims_and_round_trips_expert_rows() -> None:
    blocks, scales = mxfp4.quantize_experts(torch.randn(3, 64, 5, generator=torch.Generator().manual_seed(1)))
    stored = {"m.experts.down_proj_blocks": blocks, "m.experts.down_proj_scales": scales}
    found = scan({"quantization_config": {"quant_method": "mxfp4"}}, {k: _info(k, v) for k, v in stored.items()})
    q = found.params["m.experts.down_proj"]
    assert (q.codec, q.shape, q.primary_key) == ("mxfp4", (3, 64, 5), "m.experts.down_proj_blocks")
    assert found.is_companion("m.experts.down_proj_scales") and not found.unhandled
    parts = {"blocks": blocks, "scales": scales}
    codec = mxfp4.CODEC
    assert codec.requantizable and codec.row_align(q) == 1 and codec.part_rows(q, "scales", (1, 3)) == (1, 3)
    rows = codec.dequantize(q, parts, (1, 3))
    assert torch.equal(rows, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[1:3])
    delta = torch.full_like(rows, 0.125)
    out = codec.quantize(q, rows + delta, (1, 3), parts)
    want = mxfp4.quantize_experts(rows + delta)
    assert torch.equal(out["blocks"], want[0]) and torch.equal(out["scales"], want[1])
    assert out["blocks"].shape == blocks[1:3].shape and out["scales"].shape == scales[1:3].shape


def test_codec_refuses_nan_scales_and_non_finite_sums() -> None:
    blocks, scales = mxfp4.quantize_experts(torch.ones(1, 32, 2))
    q = mxfp4.CODEC.claims(None, {"e_blocks": _info("e_blocks", blocks), "e_scales": _info("e_scales", scales)})[0]["e"]
    scales[0, 1, 0] = 255
    with pytest.raises(QuantError, match="scale of 255"):
        mxfp4.CODEC.dequantize(q, {"blocks": blocks, "scales": scales})
    with pytest.raises(QuantError, match="not finite"):
        mxfp4.CODEC.quantize(q, torch.full((1, 32, 2), float("inf")), (0, 1), {"blocks": blocks, "scales": scales})


@pytest.mark.parametrize(
    ("infos", "message"),
    [
        ([("e_blocks", "U8", (2, 4, 1, 16))], "has no e_scales"),
        ([("e_scales", "U8", (2, 4, 1))], "has no e_blocks"),
        ([("e_blocks", "U8", (2, 4, 1, 8)), ("e_scales", "U8", (2, 4, 1))], "expected (experts, out, in/32, 16)"),
        ([("e_blocks", "U8", (2, 4, 1, 16)), ("e_scales", "U8", (2, 4, 2))], "needs [2, 4, 1]"),
        ([("e_blocks", "I8", (2, 4, 1, 16)), ("e_scales", "U8", (2, 4, 1))], "both must be U8"),
    ],
)
def test_malformed_parts_are_problems(infos: list[tuple[str, str, tuple[int, ...]]], message: str) -> None:
    found = scan(None, {n: TensorInfo(n, d, s, 0, 0) for n, d, s in infos})
    assert not found.params and "e" in found.unhandled
    assert [p.code for p in found.problems] == ["base-quant-malformed"] and message in found.problems[0].message
