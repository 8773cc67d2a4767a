"""GPTQ reading.  No GPTQ package installs on this CPU machine without replacing torch (gptqmodel
7.7 pins torch 2.14 and CUDA), so the reference is the format's definition, written here: codes
packed field by field in Python integers (AutoGPTQ ``qlinear_cuda_old.py`` pack / GPTQModel
``dequantize_weight``), the weight computed from the unpacked integers directly."""

from __future__ import annotations

import pytest
import torch

from loratools.io.quant import gptq
from loratools.io.quant.base import QuantError
from loratools.io.quant.registry import scan
from loratools.io.tensorfile import TensorInfo


def _pack_words(fields: list[int], bits: int) -> int:
    word = 0
    for k, value in enumerate(fields):
        word |= (value & ((1 << bits) - 1)) << (bits * k)
    return word - (1 << 32) if word >= 1 << 31 else word  # as int32


def _pack(q: torch.Tensor, zeros_stored: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    per = 32 // bits
    inputs, outputs = q.shape
    qweight = [[_pack_words([int(q[w * per + k, o]) for k in range(per)], bits) for o in range(outputs)] for w in range(inputs // per)]
    groups = zeros_stored.shape[0]
    qzeros = [
        [_pack_words([int(zeros_stored[g, c * per + k]) for k in range(per)], bits) for c in range(outputs // per)] for g in range(groups)
    ]
    return torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32)


def test_hand_checked_word() -> None:
    # 4-bit: word 0x76543210 holds inputs 0..7 = 0..7; zero points stored as 7 (v1: +1 -> 8); scale 0.5
    qweight = torch.full((1, 8), 0x76543210, dtype=torch.int32)
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    w = gptq.dequantize(qweight, qzeros, scales, None, bits=4, group_size=-1, zero_offset=1)
    assert w.shape == (8, 8)
    assert w[3].tolist() == [0.5 * (i - 8) for i in range(8)]
    v2 = gptq.dequantize(qweight, qzeros, scales, None, bits=4, group_size=-1, zero_offset=0)
    assert v2[0].tolist() == [0.5 * (i - 7) for i in range(8)]
    # a negative int32 word (top field 15) reads unsigned
    top = gptq.dequantize(torch.full((1, 8), -1, dtype=torch.int32), qzeros, scales, None, bits=4, group_size=-1, zero_offset=0)
    assert top[0].tolist() == [4.0] * 8


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("version", "offset"), [("gptq", 1), ("gptq_v2", 0)])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_equals_definition(bits: int, version: str, offset: int, desc_act: bool, sym: bool) -> None:
    g = torch.Generator().manual_seed(bits * 10 + offset + 2 * desc_act + 4 * sym)
    inputs, outputs, group_size = 64, 16, 16
    groups = inputs // group_size
    top = 1 << bits
    q = torch.randint(0, top, (inputs, outputs), generator=g)
    if sym:
        zeros = torch.full((groups, outputs), top // 2)
    else:  # v1 stores zero - 1 unwrapped, so its zeros are 1..top; v2's are 0..top-1
        zeros = torch.randint(offset, top + offset, (groups, outputs), generator=g)
    scales = (torch.rand(groups, outputs, generator=g) * 0.1 + 1e-3).to(torch.float16)
    g_idx = torch.arange(inputs) // group_size
    if desc_act:
        g_idx = g_idx[torch.randperm(inputs, generator=g)]
    qweight, qzeros = _pack(q, zeros - offset, bits)
    w = gptq.dequantize(qweight, qzeros, scales, g_idx.to(torch.int32), bits=bits, group_size=group_size, zero_offset=offset)
    want = torch.tensor(
        [[float(scales[g_idx[i], o]) * (int(q[i, o]) - int(zeros[g_idx[i], o])) for i in range(inputs)] for o in range(outputs)]
    )
    assert w.dtype == torch.float32 and torch.equal(w, want)
    part = gptq.dequantize(qweight, qzeros, scales, g_idx, bits=bits, group_size=group_size, zero_offset=offset, rows=(3, 11))
    assert torch.equal(part, want[3:11])
    # the float16 value GPTQ kernels compute is this one rounded
    assert torch.equal(w.to(torch.float16), (scales[g_idx] * (q - zeros[g_idx]).to(torch.float16)).T)


def test_missing_g_idx_means_consecutive_groups() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 8), generator=g)
    zeros = torch.randint(1, 17, (2, 8), generator=g)
    scales = torch.rand(2, 8, generator=g).to(torch.float16)
    qweight, qzeros = _pack(q, zeros - 1, 4)
    implicit = gptq.dequantize(qweight, qzeros, scales, None, bits=4, group_size=16, zero_offset=1)
    explicit = gptq.dequantize(qweight, qzeros, scales, torch.arange(32) // 16, bits=4, group_size=16, zero_offset=1)
    assert torch.equal(implicit, explicit)


def test_three_bits_refused() -> None:
    with pytest.raises(ValueError, match="3 bits is not supported"):
        gptq.dequantize(
            torch.zeros(3, 8, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, 8),
            None,
            bits=3,
            group_size=-1,
            zero_offset=1,
        )


def _headers(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    names = {torch.int32: "I32", torch.float16: "F16", torch.int64: "I64"}
    return {k: TensorInfo(k, names[v.dtype], tuple(v.shape), 0, 0) for k, v in tensors.items()}


def test_codec_claims_and_dequantizes() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (64, 16), generator=g)
    zeros = torch.randint(1, 17, (2, 16), generator=g)
    scales = torch.rand(2, 16, generator=g).to(torch.float16)
    qweight, qzeros = _pack(q, zeros - 1, 4)
    g_idx = (torch.arange(64) // 32).to(torch.int32)
    stored = {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": scales, "l.g_idx": g_idx}
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}}
    found = scan(config, _headers(stored))
    t = found.params["l.weight"]
    assert (t.codec, t.shape, t.primary_key) == ("gptq", (16, 64), "l.qweight") and not found.unhandled
    assert not gptq.CODEC.requantizable
    parts = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    want = gptq.dequantize(qweight, qzeros, scales, g_idx, bits=4, group_size=32, zero_offset=1)
    assert torch.equal(gptq.CODEC.dequantize(t, parts, (2, 9)), want[2:9])
    v2 = scan({"quantization_config": {**config["quantization_config"], "format": "gptq_v2"}}, _headers(stored)).params["l.weight"]
    assert v2.params["zero_offset"] == 0 and t.params["zero_offset"] == 1
    with pytest.raises(QuantError, match="cannot be requantized"):
        gptq.CODEC.quantize(t, want, (0, 16), parts)
    g_idx[5] = 2
    with pytest.raises(QuantError, match="outside 0..1"):
        gptq.CODEC.dequantize(t, parts)


@pytest.mark.parametrize(
    ("qconfig", "message"),
    [
        ({"bits": 3}, "bits 3 is not supported"),
        ({"bits": 4, "checkpoint_format": "marlin"}, "format 'marlin'"),
        ({"bits": 4, "format": "marlin"}, "format 'marlin'"),
        ({"bits": 4, "format": "gptq_v2", "checkpoint_format": "GPTQ_V3"}, "format 'gptq_v3'"),  # the legacy field wins
        ({"bits": 4, "group_size": 8}, "in 8 group(s)"),
    ],
)
def test_unsupported_configs_are_problems(qconfig: dict[str, object], message: str) -> None:
    stored = {
        "l.qweight": torch.zeros(8, 16, dtype=torch.int32),
        "l.qzeros": torch.zeros(1, 2, dtype=torch.int32),
        "l.scales": torch.zeros(1, 16, dtype=torch.float16),
    }
    found = scan({"quantization_config": {"quant_method": "gptq", **qconfig}}, _headers(stored))
    assert not found.params and "l.weight" in found.unhandled
    assert message in found.problems[0].message and found.refusal("l.weight") == found.problems[0]
