"""The fused merge-method loops against the torch steps they replace, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loratools.fused import methods
from loratools.methods import MethodOptions, join_plan, join_rows
from loratools.methods.base import Kept, ties_mean, weighted_sum
from loratools.methods.magnitude import select_top
from loratools.methods.registry import get_method


def _bits(value: float):
    return np.asarray(value, np.float32).view(np.uint32)[()]


def test_scan_counts_and_gathers_as_float_compares():
    """Ties at both bracket ends, ±0, ±inf and NaN: the same entries as |x| > high and low <= |x| <= high, in order."""
    x = np.array([0.5, -0.25, 0.5, -0.0, 1.0, -np.inf, 0.75, np.nan, 0.25, -0.3, 0.1], np.float32)
    out = np.empty(x.size, np.uint32)
    above, n = methods.scan(x, 1.0, _bits(0.25), _bits(0.5), _bits(np.inf), out)
    a = np.abs(x)
    assert above == int((a > 0.5).sum()) == 3
    assert np.array_equal(out[:n].view(np.float32), a[(a >= 0.25) & (a <= 0.5)])


def test_scan_of_a_scaled_product_is_the_scan_of_the_rounded_product():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(100_000, generator=g)
    low, high = 0.4, 0.9
    out = np.empty(p.numel(), np.uint32)
    above, n = methods.scan(p.numpy(), 0.7, _bits(low), _bits(high), _bits(np.inf), out)
    a = (p * 0.7).abs()
    assert above == int((a > high).sum())
    assert torch.equal(torch.from_numpy(out[:n].view(np.float32)), a[(a >= low) & (a <= high)])


@pytest.mark.parametrize("chosen", [(0, 1, 2), (0, 1), (2, 1), (1, 0)])
@pytest.mark.parametrize(("name", "sign"), [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total")])
def test_join_rows_equals_apply_then_join(name, sign, chosen):
    """The fused join (thresholds, a tied cut inside the block, keep-all inputs, weights, scales, NaN and -0.0;
    pairs take join_pair, others the tiled join) against Kept.apply and the torch join, bit for bit."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 40, 300
    deltas = [torch.randn(rows, cols, generator=g) for _ in range(3)]
    deltas[0][3, :5] = torch.tensor([float("nan"), -0.0, 0.0, 1e-40, -1e-40])
    deltas[1] = torch.randint(-3, 4, (rows, cols), generator=g).float() * 0.5  # magnitudes that tie at the threshold
    kept = [select_top(deltas[0].nan_to_num(), 0.5), select_top(deltas[1], 0.3), Kept()]
    assert kept[1].strict  # a cut among tied entries
    method, options, weights = get_method(name), MethodOptions(0.5, sign), (1.0, 0.7, 1.3)
    scales = (0.5, 2.0, 1.0)
    deltas, kept = [deltas[i] for i in chosen], [kept[i] for i in chosen]
    weights, scales = tuple(weights[i] for i in chosen), tuple(scales[i] for i in chosen)
    for r0, r1 in ((0, rows), (11, 29), (3, 4)):
        blocks = torch.stack([d[r0:r1] for d in deltas])
        plan = join_plan(method, options, kept, weights, torch.float32)
        assert plan is not None
        got = join_rows(method, options, kept, blocks, r0, weights, plan, scales=scales)
        applied = [k.apply(b * s, r0, r1) for k, b, s in zip(kept, blocks, scales, strict=True)]
        want = weighted_sum(applied, weights) if name == "magnitude_prune" else ties_mean(applied, weights, options)
        assert torch.equal(got.nan_to_num(7.0).view(torch.int32), want.nan_to_num(7.0).view(torch.int32))
        assert torch.equal(got.isnan(), want.isnan())
    none = [Kept(nothing=True)] * 2
    nothing = join_rows(
        method, options, none, torch.stack(deltas[:2])[:, :rows], 0, (1.0, 1.0), join_plan(method, options, none, (1.0, 1.0), torch.float32)
    )
    assert torch.equal(nothing, torch.zeros(rows, cols)) and not bool(torch.signbit(nothing).any())


def test_join_rows_falls_back_for_masks():
    """DARE's masks take the torch steps (a mask multiplies: -0.0 and NaN·0 as PEFT's)."""
    x = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    kept = Kept(mask=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), divisor=0.5)
    assert join_plan(get_method("dare"), MethodOptions(0.5), [kept], (1.0,), torch.float32) is None
    got = join_rows(get_method("dare"), MethodOptions(0.5), [kept], x.unsqueeze(0), 0, (1.0,), None)
    assert torch.equal(got, torch.tensor([[2.0, -0.0], [0.0, -8.0]]))


def test_sample_is_the_product_at_the_positions():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(50, 4, generator=g), torch.randn(4, 30, generator=g)
    rows, cols = np.array([0, 49, 7, 7]), np.array([0, 29, 3, 4])
    out = np.ones(4, np.float32)
    methods.sample(B.numpy(), A.T.contiguous().numpy(), 0.5, rows, cols, out)
    want = 1 + (B @ A)[rows, cols] * 0.5
    assert np.allclose(out, want.numpy(), rtol=1e-6)
    assert math.isfinite(float(out.sum()))
