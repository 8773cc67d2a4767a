"""AWQ GEMM reading.  AutoAWQ 0.2.9 (deprecated) does not import with transformers 5 and pulls
triton, so the reference is the format's definition, written here: ``WQLinear_GEMM.from_linear``'s
packing (field k of a word holds column ``8 c + [0, 2, 4, 6, 1, 3, 5, 7][k]``) in Python integers,
and ``dequantize_gemm``'s ``(q - z) * s`` from the unpacked integers."""

from __future__ import annotations

import torch

from loratools.io.quant import awq
from loratools.io.quant.registry import scan
from loratools.io.tensorfile import TensorInfo

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ 0.2.9 awq/modules/linear/gemm.py order_map


def _pack(ints: torch.Tensor) -> torch.Tensor:
    rows, cols = ints.shape
    out = []
    for r in range(rows):
        row = []
        for c in range(cols // 8):
            word = 0
            for k in range(8):
                word |= int(ints[r, 8 * c + ORDER[k]]) << (4 * k)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


def test_hand_checked_word() -> None:
    # fields 0..7 of 0x75316420 are 0,2,4,6,1,3,5,7 and land in columns 0,2,4,6,1,3,5,7: columns read 0..7
    columns = awq.unpack_columns(torch.tensor([[0x75316420]], dtype=torch.int32))
    assert columns.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    w = awq.dequantize(
        torch.tensor([[0x75316420]], dtype=torch.int32),
        torch.tensor([[0x33333333]], dtype=torch.int32),  # zero 3 everywhere
        torch.full((1, 8), 0.25, dtype=torch.float16),
        group_size=128,
    )
    assert w.shape == (8, 1) and w[:, 0].tolist() == [0.25 * (c - 3) for c in range(8)]


def test_dequantize_equals_definition() -> None:
    g = torch.Generator().manual_seed(11)
    inputs, outputs, group_size = 96, 24, 32
    q = torch.randint(0, 16, (inputs, outputs), generator=g)
    zeros = torch.randint(0, 16, (inputs // group_size, outputs), generator=g)
    scales = (torch.rand(inputs // group_size, outputs, generator=g) * 0.05).to(torch.float16)
    w = awq.dequantize(_pack(q), _pack(zeros), scales, group_size=group_size)
    want = torch.tensor(
        [
            [(int(q[i, o]) - int(zeros[i // group_size, o])) * float(scales[i // group_size, o]) for i in range(inputs)]
            for o in range(outputs)
        ]
    )
    assert w.dtype == torch.float32 and torch.equal(w, want)
    assert torch.equal(awq.dequantize(_pack(q), _pack(zeros), scales, group_size=group_size, rows=(5, 17)), want[5:17])


def test_codec_claims_and_dequantizes() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (64, 16), generator=g)
    zeros = torch.randint(0, 16, (2, 16), generator=g)
    scales = torch.rand(2, 16, generator=g).to(torch.float16)
    stored = {"l.qweight": _pack(q), "l.qzeros": _pack(zeros), "l.scales": scales}
    headers = {k: TensorInfo(k, "F16" if v.dtype == torch.float16 else "I32", tuple(v.shape), 0, 0) for k, v in stored.items()}
    found = scan({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "GEMM"}}, headers)
    t = found.params["l.weight"]
    assert (t.codec, t.shape) == ("awq", (16, 64)) and not found.unhandled
    parts = {"qweight": stored["l.qweight"], "qzeros": stored["l.qzeros"], "scales": scales}
    assert torch.equal(awq.CODEC.dequantize(t, parts), awq.dequantize(parts["qweight"], parts["qzeros"], scales, group_size=32))
    for qconfig, name in (({"version": "gemv"}, "gemv"), ({"format": "gemv_fast"}, "gemv_fast"), ({"backend": "llm-awq"}, "llm-awq")):
        other = scan({"quantization_config": {"quant_method": "awq", **qconfig}}, headers)
        assert not other.params and f"format {name!r} is not supported" in other.problems[0].message
    assert scan({"quantization_config": {"quant_method": "awq", "format": "gemm", "group_size": 32}}, headers).params
