"""FP8 block scales: dequantization equals transformers' own functions bit for bit, ragged edges included;
requantization is transformers' Fp8Quantize rule, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight

from loratools.fused import e4m3
from loratools.fused.native import Loops
from loratools.io.quant.base import Codec, LowRank
from loratools.io.quant.fp8_block import CODEC
from loratools.io.tensorfile import DTYPE_NAMES, TensorInfo


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())


def _stored(shape: tuple[int, ...], block: tuple[int, int], seed: int = 0, scale_dtype: torch.dtype = torch.float32):
    """A random FP8 weight with random positive block scales of the grid ``block`` gives ``shape``."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = (torch.rand(grid, generator=g) * 1e-2 + 1e-4).to(scale_dtype)
    return weight, scale


def _claim(weight, scale, block=None, qconfig=None):
    tensors = {"m.weight": _info("m.weight", weight), "m.weight_scale_inv": _info("m.weight_scale_inv", scale)}
    config = qconfig if qconfig is not None else ({"quant_method": "fp8", "weight_block_size": list(block)} if block else None)
    found, problems = CODEC.claims(config, tensors)
    assert not problems, problems
    return found["m.weight"]


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((7, 13), (4, 4)), ((3, 10, 9), (4, 4)), ((5, 129), (128, 128))],
)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu])
def test_dequantize_equals_transformers_reference(shape, block, scale_dtype):
    weight, scale = _stored(shape, block, scale_dtype=scale_dtype)
    q = _claim(weight, scale, block)
    got = CODEC.dequantize(q, {"weight": weight, "weight_scale_inv": scale})
    want = _dequantize_fp8_weight(weight, scale, list(block), torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_dequantize_equals_fp8_dequantize_on_whole_blocks():
    weight, scale = _stored((256, 384), (128, 128), seed=3)
    q = _claim(weight, scale)  # no config: the block is derived from the grid
    assert q.params["block"] == (128, 128)
    want = Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32)
    assert torch.equal(CODEC.dequantize(q, {"weight": weight, "weight_scale_inv": scale}), want)


def test_row_blocks_concatenate_to_the_whole_tensor():
    weight, scale = _stored((300, 200), (128, 128), seed=1)
    q = _claim(weight, scale, (128, 128))
    parts = {"weight": weight, "weight_scale_inv": scale}
    assert CODEC.row_align(q) == 128
    blocks = [CODEC.dequantize(q, parts, (r, min(300, r + 128))) for r in range(0, 300, 128)]
    assert torch.equal(torch.cat(blocks), CODEC.dequantize(q, parts))
    assert CODEC.part_rows(q, "weight_scale_inv", (256, 300)) == (2, 3)


def test_per_tensor_scale():
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.25])
    q = _claim(weight, scale)
    assert q.params["per_tensor"]
    assert CODEC.dequantize(q, {"weight": weight, "weight_scale_inv": scale}).tolist() == [[0.25, -0.5], [0.125, 1.0]]


def test_quantize_hand_checked():
    # amax 4 -> s = 448/4 = 112; q = W·112 = [112, -224, 56, 448], all exact in e4m3; scale_inv = 1/112
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    weight, scale = w.to(torch.float8_e4m3fn), torch.ones(1, 1)
    q = _claim(weight, scale, (2, 2))
    out = CODEC.quantize(q, w, (0, 2), {"weight": weight, "weight_scale_inv": scale})
    assert out["weight"].float().tolist() == [[112.0, -224.0], [56.0, 448.0]]
    assert out["weight_scale_inv"].tolist() == [[torch.tensor(1.0 / 112.0).item()]]


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize(("shape", "block"), [((256, 384), (128, 128)), ((8, 12), (4, 4)), ((2, 8, 12), (4, 4))])
def test_quantize_equals_transformers_fp8_quantize(shape, block, scale_fmt):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(shape, generator=g) * 0.02
    w[..., : block[0], : block[1]] = 0.0  # an all-zero block keeps scale 1
    qconfig = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    want = Fp8Quantize(SimpleNamespace(quantization_config=qconfig))._quantize_one("m.weight", w)
    stored_scale = want["m.weight_scale_inv"]
    q = _claim(want["m.weight"], stored_scale, qconfig={"quant_method": "fp8", "weight_block_size": list(block), "scale_fmt": scale_fmt})
    got = CODEC.quantize(q, w, CODEC.all_rows(q), {"weight": want["m.weight"], "weight_scale_inv": stored_scale})
    assert torch.equal(got["weight"].view(torch.uint8), want["m.weight"].view(torch.uint8))
    assert got["weight_scale_inv"].dtype == stored_scale.dtype
    assert torch.equal(got["weight_scale_inv"].float(), stored_scale.float())


def test_quantize_ragged_equals_transformers_on_zero_padding():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(w, (0, 56, 0, 84))
    qconfig = FineGrainedFP8Config(weight_block_size=(128, 128))
    want = Fp8Quantize(SimpleNamespace(quantization_config=qconfig))._quantize_one("m.weight", padded)
    weight, scale = want["m.weight"][:300, :200].contiguous(), want["m.weight_scale_inv"]
    q = _claim(weight, scale, (128, 128))
    parts = {"weight": weight, "weight_scale_inv": scale}
    blocks = [CODEC.quantize(q, w[r : r + 128], (r, min(300, r + 128)), parts) for r in range(0, 300, 128)]
    assert torch.equal(torch.cat([b["weight"] for b in blocks]).view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(torch.cat([b["weight_scale_inv"] for b in blocks]), scale)


def test_requantize_round_trip_is_stable():
    """quantize(dequantize(Q)) == Q: a merge with ΔW = 0 rewrites the stored bytes unchanged."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(8))
    weight, scale = _stored((300, 200), (128, 128))
    q = _claim(weight, scale, (128, 128))
    first = CODEC.quantize(q, w, CODEC.all_rows(q), {"weight": weight, "weight_scale_inv": scale})
    again = CODEC.quantize(q, CODEC.dequantize(q, first), CODEC.all_rows(q), first)
    assert torch.equal(again["weight"].view(torch.uint8), first["weight"].view(torch.uint8))
    assert torch.equal(again["weight_scale_inv"], first["weight_scale_inv"])


def test_malformed_scales_are_problems():
    weight, scale = _stored((300, 200), (128, 128))
    tensors = {"m.weight": _info("m.weight", weight), "m.weight_scale_inv": _info("m.weight_scale_inv", scale[:1])}
    found, problems = CODEC.claims({"quant_method": "fp8", "weight_block_size": [128, 128]}, tensors)
    assert not found
    assert [p.code for p in problems] == ["base-quant-malformed"]
    assert "needs [3, 2]" in problems[0].message
    bf16 = {"m.weight": _info("m.weight", weight.to(torch.bfloat16)), "m.weight_scale_inv": _info("m.weight_scale_inv", scale)}
    assert "stored as BF16" in CODEC.claims(None, bf16)[1][0].message
    alone = {"m.weight_scale_inv": _info("m.weight_scale_inv", scale)}
    assert "has no m.weight" in CODEC.claims(None, alone)[1][0].message


@pytest.mark.parametrize(
    ("shape", "rows"), [((256, 384), (0, 256)), ((256, 384), (128, 256)), ((300, 200), (256, 300)), ((300, 256), (0, 128))]
)
@pytest.mark.parametrize(
    ("scale_dtype", "scale_fmt"), [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "ue8m0"), (torch.float8_e8m0fnu, None)]
)
def test_fused_requantize_equals_the_unfused_methods(shape, rows, scale_dtype, scale_fmt):
    """Fp8Block.requantize (table-scaled decode, reused buffers) writes the bytes and scales, and gives the two
    survival norms, of Codec.requantize's dequantize -> edit -> quantize -> dequantize, bit for bit."""
    weight, scale = _stored(shape, (128, 128), seed=5, scale_dtype=scale_dtype)
    weight[:128, :128] = 0  # an all-zero block keeps scale 1 unless ΔW lands in it
    config = {"quant_method": "fp8", "weight_block_size": [128, 128]} | ({"scale_fmt": scale_fmt} if scale_fmt else {})
    q = _claim(weight, scale, qconfig=config)
    parts = {"weight": weight, "weight_scale_inv": scale}
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(rows[1] - rows[0], shape[1], generator=g) * 1e-3
    delta[:, -7:] *= 1e6  # saturates the last block column's old scale: a fresh, larger scale
    results = []
    for requantize in (CODEC.requantize, lambda *a: Codec.requantize(CODEC, *a)):
        s = CODEC.part_rows(q, "weight_scale_inv", rows)
        out = {
            "weight": torch.zeros(rows[1] - rows[0], shape[1], dtype=torch.float8_e4m3fn),
            "weight_scale_inv": torch.zeros_like(scale[s[0] : s[1]]),
        }
        norms = requantize(q, parts, rows, lambda base: base + delta, out)
        results.append((norms, out["weight"].view(torch.uint8), out["weight_scale_inv"].to(torch.float32)))
    (fused, w1, s1), (plain, w2, s2) = results
    assert torch.equal(w1, w2) and torch.equal(s1, s2)
    assert fused == pytest.approx(plain, rel=1e-5)  # the same sums, taken in another order
    assert 0 < fused[0] and 0 < fused[1]


@pytest.mark.parametrize(
    ("scale_dtype", "scale_fmt"), [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "ue8m0"), (torch.float8_e8m0fnu, None)]
)
@pytest.mark.parametrize("ranks", [(4,), (4, 0, 7)])
def test_low_rank_terms_fused_into_the_decode_write_quantize_of_their_rule(scale_dtype, scale_fmt, ranks):
    """Given the edit as low-rank terms, W' is formed by LowRank's rule inside the compiled passes (F32 scales: one
    pass a strip of blocks; others: merge, then the scales, then requantize): the bytes and scales equal those of
    Codec.requantize's unfused methods with LowRank.apply as the edit, bit for bit; the norms agree."""
    weight, scale = _stored((300, 700), (128, 128), seed=7, scale_dtype=scale_dtype)
    config = {"quant_method": "fp8", "weight_block_size": [128, 128]} | ({"scale_fmt": scale_fmt} if scale_fmt else {})
    q = _claim(weight, scale, qconfig=config)
    parts = {"weight": weight, "weight_scale_inv": scale}
    g = torch.Generator().manual_seed(8)
    rows = (128, 300)
    low_rank = LowRank(
        tuple(
            (torch.randn(300, r, generator=g)[rows[0] : rows[1]], torch.randn(r, 700, generator=g), 0.01 * (i + 1))
            for i, r in enumerate(ranks)
        )
    )
    results = []
    for requantize in (lambda *a: CODEC.requantize(*a, low_rank=low_rank), lambda *a: Codec.requantize(CODEC, *a)):
        s = CODEC.part_rows(q, "weight_scale_inv", rows)
        out = {
            "weight": torch.zeros(rows[1] - rows[0], 700, dtype=torch.float8_e4m3fn),
            "weight_scale_inv": torch.zeros_like(scale[s[0] : s[1]]),
        }
        norms = requantize(q, parts, rows, low_rank.apply, out)
        results.append((norms, out["weight"].view(torch.uint8), out["weight_scale_inv"].to(torch.float32)))
    (fused, w1, s1), (plain, w2, s2) = results
    assert torch.equal(w1, w2) and torch.equal(s1, s2)
    assert fused == pytest.approx(plain, rel=1e-5)
    assert CODEC.streams_low_rank(q) == (scale_dtype == torch.float32 and scale_fmt is None)


def test_low_rank_rule_accumulates_rank_by_rank():
    """LowRank.apply: each term's products summed rank by rank from the first (rounded, then added), then scaled,
    then added, in order; a rank-0 term adds nothing; the input is left as it was."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=g)
    B, A = torch.randn(5, 3, generator=g), torch.randn(3, 6, generator=g)
    low_rank = LowRank(((B, A, 0.3), (torch.zeros(5, 0), torch.zeros(0, 6), 2.0), (B[:, :1], A[:1], -1.5)))
    before = w.clone()
    got = low_rank.apply(w)
    product = (B[:, 0:1] * A[0:1] + B[:, 1:2] * A[1:2]) + B[:, 2:3] * A[2:3]
    assert torch.equal(got, (w + product * 0.3) + (B[:, :1] * A[:1]) * -1.5) and torch.equal(w, before)
    assert torch.allclose(got, w + (B @ A) * 0.3 - 1.5 * B[:, :1] @ A[:1], atol=1e-5)


def test_prepare_loads_the_loops_once_in_the_background(monkeypatch: pytest.MonkeyPatch):
    """prepare() starts one (non-daemon) thread that loads the compiled loops; asking again starts no other."""
    loops = Loops(e4m3.LOOPS.module, e4m3.ENTRIES)
    monkeypatch.setattr(e4m3, "LOOPS", loops)  # not loaded yet, so prepare() has a load to start
    CODEC.prepare()
    first = loops.thread
    CODEC.prepare()
    assert first is not None and loops.thread is first and not first.daemon
    first.join(timeout=120)
    assert not first.is_alive()
