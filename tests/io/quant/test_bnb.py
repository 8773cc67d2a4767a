"""bitsandbytes NF4/FP4 reading equals bitsandbytes' own CPU dequantize_4bit (the reference), bit for bit;
the codec claims through the registry's small-tensor reader and refuses malformed quant states by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from loratools.io.checkpoint import open_checkpoint  # noqa: E402
from loratools.io.quant import bnb  # noqa: E402
from loratools.io.quant.base import SMALL_BYTES, QuantError  # noqa: E402
from loratools.io.quant.registry import dequantized, reader, scan  # noqa: E402


def _saved(w: torch.Tensor, blocksize: int, nested: bool, quant_type: str = "nf4") -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state.as_dict(packed=True), state


def test_fp4_code_book_is_bitsandbytes() -> None:
    assert torch.equal(torch.tensor(bnb.FP4), bnb_functional.get_4bit_type("fp4", device="cpu"))  # -0.0 == 0.0 at code 8
    assert torch.equal(torch.tensor(bnb.NF4), bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("shape", "blocksize"), [((64, 48), 64), ((33, 7), 64), ((130, 50), 128), ((5, 3), 32), ((1, 4097), 4096), ((300, 64), 32)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_bitsandbytes(quant_type: str, nested: bool, shape: tuple[int, int], blocksize: int, dtype: torch.dtype) -> None:
    torch.manual_seed(shape[0] * shape[1] + blocksize)
    packed, saved, state = _saved(torch.randn(*shape).to(dtype), blocksize, nested, quant_type)
    parsed = bnb.parse_state(bytes(saved[f"quant_state.bitsandbytes__{quant_type}"].numpy()))
    assert parsed.shape == shape and parsed.blocksize == blocksize and (parsed.nested_blocksize is not None) == nested
    assert parsed.quant_type == quant_type
    assert torch.equal(saved["quant_map"], torch.tensor(bnb.CODE_BOOKS[quant_type]))
    ours = bnb.dequantize(
        packed, saved["absmax"], parsed, nested_absmax=saved.get("nested_absmax"), nested_quant_map=saved.get("nested_quant_map")
    )
    reference = bnb_functional.dequantize_4bit(packed, state)
    assert ours.dtype == torch.float32 and reference.dtype == dtype
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    if quant_type == "fp4" and shape[1] % 2:  # bitsandbytes' pure-torch fallback (odd widths) decodes code 8 as +0.0
        assert torch.equal(ours.to(dtype), reference)
    else:
        assert torch.equal(ours.to(dtype).view(bits), reference.view(bits))
    for rows in ((1, min(4, shape[0])), (shape[0] // 2, shape[0])):  # (300, 64) in 32s: 600 scales, 3 nested blocks
        nested_parts = {"nested_absmax": saved.get("nested_absmax"), "nested_quant_map": saved.get("nested_quant_map")}
        part = bnb.dequantize(packed, saved["absmax"], parsed, **nested_parts, rows=rows)
        assert torch.equal(part.view(torch.int32), ours[rows[0] : rows[1]].view(torch.int32))


def test_hand_checked_bytes() -> None:
    # byte 0xF0: element 0 is the high nibble (code 15 = +1.0), element 1 the low one (code 0 = -1.0)
    state = bnb.State(shape=(1, 4), blocksize=32, dtype="float32")
    w = bnb.dequantize(torch.tensor([[0xF0], [0x07]], dtype=torch.uint8), torch.tensor([2.0]), state)
    assert w.tolist() == [[2.0, -2.0, -2.0, 0.0]]  # 0x07: code 0 (-1.0), code 7 (0.0)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [4, 4]}, "quant_type 'int4'"),
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


W = "m.q.weight"  # NF4, double-quantized, ragged last block
F = "m.f.weight"  # FP4, plain float32 scales


def _file(path: Path, edit: dict[str, torch.Tensor] | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors file holding two 4-bit weights as transformers saves them (``<weight>.<as_dict key>``)."""
    torch.manual_seed(3)
    reference: dict[str, torch.Tensor] = {}
    stored: dict[str, torch.Tensor] = {"m.norm.weight": torch.ones(7)}
    for key, shape, quant_type, nested in ((W, (33, 7), "nf4", True), (F, (8, 16), "fp4", False)):
        packed, saved, state = _saved(torch.randn(*shape), 64, nested, quant_type)
        stored[key] = packed
        stored |= {f"{key}.{k}": v for k, v in saved.items()}
        reference[key] = bnb_functional.dequantize_4bit(packed, state)
    stored |= edit or {}
    save_file(stored, path / "model.safetensors")
    return path, reference


def test_codec_claims_through_the_reader(tmp_path: Path) -> None:
    checkpoint = open_checkpoint(_file(tmp_path)[0])
    headers_only = scan(None, checkpoint.tensors)  # the shape is in data: nothing claimed, refused by name
    assert not headers_only.params and set(headers_only.unhandled) == {W, F}
    found = scan({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, checkpoint.tensors, reader(checkpoint))
    assert not found.unhandled and not found.problems
    assert {k: (q.codec, q.shape, q.label) for k, q in found.params.items()} == {
        W: ("bnb-4bit", (33, 7), "bitsandbytes NF4, block size 64, double-quantized scales"),
        F: ("bnb-4bit", (8, 16), "bitsandbytes FP4, block size 64"),
    }
    assert found.is_companion(f"{W}.quant_state.bitsandbytes__nf4") and not found.is_companion(W)
    assert found.logical(checkpoint.tensors)[W].shape == (33, 7)  # not the packed (116, 1)
    codec = bnb.CODEC
    assert codec.part_rows(found.params[W], "weight", (1, 3)) == (3, 11)  # elements 7..21: bytes 3..10
    assert codec.part_rows(found.params[W], "absmax", (1, 3)) == (0, 4)


def test_codec_dequantizes_bit_for_bit(tmp_path: Path) -> None:
    path, reference = _file(tmp_path)
    checkpoint = open_checkpoint(path)
    found = scan(None, checkpoint.tensors, reader(checkpoint))
    for key, want in reference.items():
        assert torch.equal(dequantized(checkpoint, found.params[key]).view(torch.int32), want.view(torch.int32)), key


def _problem(tmp_path: Path, edit: dict[str, torch.Tensor]) -> str:
    checkpoint = open_checkpoint(_file(tmp_path, edit)[0])
    found = scan(None, checkpoint.tensors, reader(checkpoint))
    assert W not in found.params and F in found.params
    problem = found.refusal(W)
    assert problem is not None and problem.code == "base-quant-malformed" and problem.where == W
    return problem.message


def _state(shape: list[int], quant_type: str = "nf4") -> torch.Tensor:
    raw = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": shape, "nested_blocksize": 256, "nested_offset": 0.1}
    return torch.frombuffer(bytearray(json.dumps(raw).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({f"{W}.quant_state.bitsandbytes__nf4": _state([33, 8])}, r"is U8 \[116, 1\], but a \[33, 8\] weight .* needs U8 \[132, 1\]"),
        ({f"{W}.quant_state.bitsandbytes__nf4": _state([66, 7])}, r"m.q.weight is U8 \[116, 1\]"),
        ({f"{W}.quant_state.bitsandbytes__nf4": _state([33, 7], "fp4")}, "says quant_type 'fp4' but is stored as bitsandbytes__nf4"),
        ({f"{W}.quant_state.bitsandbytes__nf4": torch.zeros(5000, dtype=torch.uint8)}, r"\(5000 bytes; expected U8 of at most 4096\)"),
        ({f"{W}.quant_state.bitsandbytes__nf4": torch.zeros(4, 4, dtype=torch.uint8)}, r"is U8 \[4, 4\]"),
        ({f"{W}.quant_map": torch.arange(16, dtype=torch.float32)}, "quant_map is not bitsandbytes' NF4 table"),
        ({f"{W}.quant_map": torch.zeros(17)}, "quant_map must be F32 \\[16\\]"),
        ({f"{W}.nested_absmax": torch.zeros(2)}, r"m.q.weight.nested_absmax is F32 \[2\]"),
        ({f"{W}.absmax": torch.zeros(4)}, r"m.q.weight.absmax is F32 \[4\], .* needs U8 \[4\]"),
    ],
)
def test_malformed_quant_state_is_refused_by_name(tmp_path: Path, edit: dict[str, torch.Tensor], message: str) -> None:
    assert re.search(message, _problem(tmp_path, edit))


def test_reader_reads_small_tensors_only(tmp_path: Path) -> None:
    save_file({"big": torch.zeros(SMALL_BYTES // 4 + 1), "small": torch.ones(3)}, tmp_path / "model.safetensors")
    read = reader(open_checkpoint(tmp_path))
    assert read(["small"])["small"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(QuantError, match=f"big: {SMALL_BYTES + 4} bytes, more than the {SMALL_BYTES}"):
        read(["big"])
