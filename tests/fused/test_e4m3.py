"""The fused e4m3 loops against torch's own float8 casts, bit for bit, on every byte and every rounding boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.fused import e4m3
from loratools.io.quant.base import LowRank

FP8 = torch.float8_e4m3fn


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bits with every NaN made one pattern (torch and the loops may pick different NaN payloads)."""
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int32)


def test_decode_every_byte_times_its_block_scale():
    """All 256 bytes (subnormals, ±0, ±448, both NaNs), ragged blocks, scales that make products subnormal."""
    shape, block = (300, 520), (128, 128)
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = raw.repeat(-(-shape[0] * shape[1] // 256))[: shape[0] * shape[1]].reshape(shape)
    scale = torch.tensor([[1.0, 3.0e-3, 2.0**-140, 0.7, 5.0], [2.0**-20, 1e30, 1.5, 2.0**-126, 1.0], [0.25, 1.0, 7.0, 1e-3, 2.0]])
    out = np.empty(shape, np.float32)
    e4m3.decode(q.numpy(), scale.numpy(), *block, out)
    want = q.view(FP8).to(torch.float32) * _expand(scale, shape, block)
    assert torch.equal(_bits(torch.from_numpy(out)), _bits(want))
    assert int(torch.from_numpy(out).isnan().sum()) == int(want.isnan().sum()) > 0


def _boundaries() -> torch.Tensor:
    """Float32 values at and around every e4m3 rounding boundary, both signs, up to ±448, NaN, ±0, plus random ones."""
    high = torch.arange(1 << 12, dtype=torch.int64) << 20  # sign, exponent and the 3 kept mantissa bits
    low = torch.tensor([0, 1, 0x3FFFF, 0x7FFFF, 0x80000, 0x80001, 0xC0000, 0xFFFFF])  # the dropped bits: ties and neighbours
    bits = (high[:, None] | low[None, :]).reshape(-1)
    values = torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))
    values = values[values.abs() <= 448]
    g = torch.Generator().manual_seed(0)
    extra = [torch.randn(200_000, generator=g) * 100, torch.randn(200_000, generator=g) * 1e-2, torch.tensor([0.0, -0.0, 448.0, -448.0])]
    return torch.cat([values, -values, *extra])


def _base(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Random finite e4m3 bytes and their float32 values (scale 1)."""
    q = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 0
    return q.numpy(), q.view(FP8).to(torch.float32)


def test_requantize_rounds_as_torch_casts_and_measures_what_it_wrote():
    """clamp(x·s, ±448) cast to e4m3 equals torch's cast for every boundary value; the norms are those of the decoded bytes."""
    values = _boundaries()
    n = values.numel() // 64 * 64
    scale, inv, old = np.full((1, 1), 1.0, np.float32), np.full((1, 1), 0.5, np.float32), np.ones((1, 1), np.float32)
    for x, finite in ((values[:n], True), (torch.cat([torch.tensor([float("nan"), -float("nan"), 1e9, -1e9]), values[: n - 4]]), False)):
        x = x.reshape(64, -1).contiguous()
        q, base = _base(tuple(x.shape), 1)
        out = np.empty(x.shape, np.uint8)
        kept, delta = e4m3.requantize(x.numpy(), q, old, scale, inv, 64, x.shape[1], out)
        want = x.clamp(-448, 448).to(FP8)
        assert torch.equal(torch.from_numpy(out), want.view(torch.uint8))
        if finite:
            assert kept == pytest.approx(float(((want.to(torch.float32) * 0.5 - base).double() ** 2).sum()), rel=1e-6)
            assert delta == pytest.approx(float(((x - base).double() ** 2).sum()), rel=1e-6)
        else:  # a NaN weight makes both norms NaN, as torch's would
            assert np.isnan(kept) and np.isnan(delta)


def test_requantize_block_scales_and_norms():
    """Per-block multipliers on ragged blocks; both norms equal float64 sums of the eager results."""
    g = torch.Generator().manual_seed(2)
    shape, block = (200, 300), (128, 128)
    q, decoded = _base(shape, 3)
    old = torch.rand(2, 3, generator=g) * 1e-2
    base = decoded * _expand(old, shape, block)
    x = base + torch.randn(shape, generator=g) * 1e-2
    scale = torch.rand(2, 3, generator=g) * 100 + 1
    inv = 1 / scale
    out = np.empty(shape, np.uint8)
    kept, delta = e4m3.requantize(x.numpy(), q, old.numpy(), scale.numpy(), inv.numpy(), *block, out)
    new_q = (x * _expand(scale, shape, block)).clamp(-448, 448).to(FP8)
    assert torch.equal(torch.from_numpy(out), new_q.view(torch.uint8))
    new = new_q.to(torch.float32) * _expand(inv, shape, block)
    assert kept == pytest.approx(float(((new - base).double() ** 2).sum()), rel=1e-6)
    assert delta == pytest.approx(float(((x - base).double() ** 2).sum()), rel=1e-6)


def _terms(n: int, k: int, ranks: tuple[int, ...], seed: int) -> LowRank:
    """Random terms; every third row of each B is -0.0 and every fifth column of each A +0.0, so products of ±0 land on
    the base's ±0 bytes (the sign of zero is the byte 0x00 or 0x80)."""
    g = torch.Generator().manual_seed(seed)
    terms = tuple(
        (torch.randn(n, r, generator=g) * 0.05, torch.randn(r, k, generator=g) * 0.05, 0.37 * (t + 1)) for t, r in enumerate(ranks)
    )
    for B, A, _ in terms:
        B[::3] = -0.0
        A[:, ::5] = 0.0
    return LowRank(terms)


# ranks through every path of the product loops (eight, four and one rank a pass), a rank-0 term, several terms
RANKS = [(16,), (1,), (3,), (5,), (13,), (4, 0, 9), (8, 2)]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("shape", [(300, 200), (301, 700), (129, 1030)])
def test_merge_adds_the_terms_by_the_low_rank_rule_and_takes_block_maxima(shape, ranks):
    """x = float(q)·scale + Σ P_t·s_t equals LowRank.apply on the decoded rows bit for bit (odd rows, ragged blocks,
    strips of blocks over wide rows); amax as block_amax."""
    block = (128, 128)
    q, decoded = _base(shape, 5)
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    old = torch.rand(grid, generator=torch.Generator().manual_seed(4))
    low_rank = _terms(*shape, ranks, seed=6)
    x, amax = np.empty(shape, np.float32), np.zeros(grid, np.float32)
    e4m3.merge(q, old.numpy(), low_rank.packed(), *block, x, amax.view(np.int32))
    want = low_rank.apply(decoded * _expand(old, shape, block))
    assert torch.equal(torch.from_numpy(x).view(torch.int32), want.view(torch.int32))  # bits: the sign of zero too
    padded = torch.nn.functional.pad(want, (0, -shape[1] % 128, 0, -shape[0] % 128))
    assert torch.equal(torch.from_numpy(amax), padded.abs().reshape(grid[0], 128, grid[1], 128).amax(dim=(1, 3)))


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("shape", [(300, 200), (301, 700), (129, 1030)])
def test_merge_requantize_equals_the_passes_one_after_the_other(shape, ranks):
    """Bytes and scale inverses of merge_requantize equal merge -> scales -> requantize (each checked against torch);
    both survival norms agree with float64 sums of the same terms; a NaN and a saturated row included."""
    block = (128, 128)
    q, decoded = _base(shape, 7)
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    old = torch.rand(grid, generator=torch.Generator().manual_seed(8)) * 1e-2
    old[0, 0] = 0.0  # an all-zero block: ΔW alone sets its scale
    low_rank = _terms(*shape, ranks, seed=9)
    if ranks == (16,):
        q[5, 3] = 0x7F  # NaN: both norms are NaN; its block keeps scale 1 (Fp8Quantize's amax > 0 test is false)
        low_rank.terms[0][0][-1] *= 1e6  # the last row far above its block's old range: a fresh, larger scale
    packed = low_rank.packed()
    out, inv = np.empty(shape, np.uint8), np.empty(grid, np.float32)
    kept, delta = e4m3.merge_requantize(q, old.numpy(), packed, *block, out, inv)
    x, amax = np.empty(shape, np.float32), np.zeros(grid, np.float32)
    e4m3.merge(q, old.numpy(), packed, *block, x, amax.view(np.int32))
    scale, inv2 = np.empty(grid, np.float32), np.empty(grid, np.float32)
    e4m3.scales(amax, scale, inv2)
    out2 = np.empty(shape, np.uint8)
    kept2, delta2 = e4m3.requantize(x, q, old.numpy(), scale, inv2, *block, out2)
    assert np.array_equal(out, out2) and np.array_equal(inv, inv2)
    if ranks == (16,):
        assert np.isnan(kept) and np.isnan(delta) and inv[0, 0] == 1.0
    else:
        assert kept == pytest.approx(kept2, rel=1e-5) and delta == pytest.approx(delta2, rel=1e-5)
        base = decoded * _expand(old, shape, block)
        new = torch.from_numpy(out).view(FP8).to(torch.float32) * _expand(torch.from_numpy(inv), shape, block)
        assert kept == pytest.approx(float(((new - base).double() ** 2).sum()), rel=1e-5)
        assert delta == pytest.approx(float(((torch.from_numpy(x) - base).double() ** 2).sum()), rel=1e-5)


def test_load_links_the_loops_image():
    """The background warm-up of the FP8 codec links the image (built here when none is cached): no numba dispatch."""
    e4m3.load()
    assert e4m3.LOOPS.backend == "image", e4m3.LOOPS.why_numba


def test_empty_rows_return_at_once():
    """Sizes reach the loops only when positive (a loop's step may not be 0), so empty rows never call them."""
    q, old, inv = np.zeros((0, 256), np.uint8), np.ones((0, 2), np.float32), np.zeros((0, 2), np.float32)
    terms = LowRank(((torch.zeros(0, 1), torch.zeros(1, 256), 1.0),)).packed()
    assert e4m3.merge_requantize(q, old, terms, 128, 128, q.copy(), inv) == (0.0, 0.0)
    assert e4m3.requantize(np.zeros((0, 256), np.float32), q, old, old, old, 128, 128, q.copy()) == (0.0, 0.0)


def test_scales_are_fp8_quantizes_rule():
    """448 / amax as torch evaluates it (the reciprocal, then times 448), 1 for an all-zero or NaN block, and 1 / scale."""
    amax = torch.tensor([[0.0, 1e-3, 3.7], [448.0, float("nan"), 1e-30]])
    scale, inv = np.empty((2, 3), np.float32), np.empty((2, 3), np.float32)
    e4m3.scales(amax.numpy(), scale, inv)
    positive = amax > 0
    want = torch.where(positive, 448.0 / torch.where(positive, amax, torch.ones_like(amax)), torch.ones_like(amax))
    assert torch.equal(torch.from_numpy(scale), want)
    assert torch.equal(torch.from_numpy(inv), (1.0 / want).to(torch.float32))


def test_block_amax_on_ragged_blocks_and_nan():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 200, generator=g)
    x[5, 150] = float("nan")
    x[290, 10] = -1e6
    out = np.zeros((3, 2), np.float32)
    e4m3.block_amax(x.numpy().view(np.int32), 128, 128, out.view(np.int32))
    padded = torch.nn.functional.pad(x, (0, 56, 0, 84))
    want = padded.abs().reshape(3, 128, 2, 128).amax(dim=(1, 3))
    assert torch.equal(_bits(torch.from_numpy(out)), _bits(want))
    assert np.isnan(out[0, 1]) and out[2, 0] == 1e6
