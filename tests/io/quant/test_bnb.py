"""bitsandbytes NF4 reading equals bitsandbytes' own CPU dequantize_4bit (the reference), bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from loratools.io.quant import bnb  # noqa: E402


def _saved(w: torch.Tensor, blocksize: int, nested: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    return packed, state.as_dict(packed=True), state


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("shape", "blocksize"), [((64, 48), 64), ((33, 7), 64), ((130, 50), 128), ((5, 3), 32), ((1, 4097), 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_bitsandbytes(nested: bool, shape: tuple[int, int], blocksize: int, dtype: torch.dtype) -> None:
    torch.manual_seed(shape[0] * shape[1] + blocksize)
    packed, saved, state = _saved(torch.randn(*shape).to(dtype), blocksize, nested)
    parsed = bnb.parse_state(bytes(saved["quant_state.bitsandbytes__nf4"].numpy()))
    assert parsed.shape == shape and parsed.blocksize == blocksize and (parsed.nested_blocksize is not None) == nested
    assert torch.equal(saved["quant_map"], torch.tensor(bnb.NF4))
    ours = bnb.dequantize(
        packed, saved["absmax"], parsed, nested_absmax=saved.get("nested_absmax"), nested_quant_map=saved.get("nested_quant_map")
    )
    reference = bnb_functional.dequantize_4bit(packed, state)
    assert ours.dtype == torch.float32 and reference.dtype == dtype
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.to(dtype).view(bits), reference.view(bits))
    rows = (1, min(4, shape[0]))
    part = bnb.dequantize(
        packed, saved["absmax"], parsed, nested_absmax=saved.get("nested_absmax"), nested_quant_map=saved.get("nested_quant_map"), rows=rows
    )
    assert torch.equal(part, ours[rows[0] : rows[1]])


def test_hand_checked_bytes() -> None:
    # byte 0xF0: element 0 is the high nibble (code 15 = +1.0), element 1 the low one (code 0 = -1.0)
    state = bnb.State(shape=(1, 4), blocksize=32, dtype="float32")
    w = bnb.dequantize(torch.tensor([[0xF0], [0x07]], dtype=torch.uint8), torch.tensor([2.0]), state)
    assert w.tolist() == [[2.0, -2.0, -2.0, 0.0]]  # 0x07: code 0 (-1.0), code 7 (0.0)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [4, 4]}, "quant_type 'fp4'"),
        ({"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [4, 4]}, "blocksize 48"),
        ({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [4, 4]}, "dtype 'int8'"),
        ({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, -1]}, "shape"),
        (
            {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 4], "nested_blocksize": 256, "nested_offset": "x"},
            "nested_offset",
        ),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_quant_state_refused(state: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bnb.parse_state(json.dumps(state).encode())
    with pytest.raises(ValueError, match="not JSON"):
        bnb.parse_state(b"\xff{")
