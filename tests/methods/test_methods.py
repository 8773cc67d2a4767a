"""Each method on hand-worked tensors, against PEFT 0.21's merge_utils on the same inputs, and DARE's statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from loratools import ArgumentError
from loratools.compute import single_threaded
from loratools.methods import MethodOptions, get_method, module_generator
from loratools.methods.della import select_della
from loratools.methods.magnitude import Bracket, _bits, kth_largest_magnitude, select_top, trim

X = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
Y = torch.tensor([[-2.0, 2.0], [1.0, 1.0]])


def run(name: str, deltas, weights, density=1.0, sign="total", gen=None, epsilon=0.0):
    return get_method(name).combine(deltas, weights, MethodOptions(density, sign, 0, epsilon), gen)


def test_trim_keeps_the_largest_magnitudes_over_the_whole_tensor():
    # |X| = 3, 1, 0.5, 4: density 0.5 keeps k = 2 entries, 3 and -4
    assert torch.equal(trim(X, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    assert torch.equal(trim(X, 0.3), torch.tensor([[0.0, 0.0], [0.0, -4.0]]))  # k = floor(1.2) = 1
    assert torch.equal(trim(X, 1.0), X)


def test_trim_with_ties_at_the_threshold_keeps_exactly_k_first_in_row_major_order():
    # |Z| = 1, 2, 2, 2, 2, 0.5: k = 3 of the four 2s, the first three in row-major order (flat 1, 2, 3)
    Z = torch.tensor([[1.0, -2.0, 2.0], [2.0, -2.0, 0.5]])
    assert torch.equal(trim(Z, 0.5), torch.tensor([[0.0, -2.0, 2.0], [2.0, 0.0, 0.0]]))
    kept = select_top(Z, 0.5)
    rows = torch.cat([kept.apply(Z[r : r + 1], r, r + 1) for r in range(2)])  # row blocks agree with the whole
    assert torch.equal(rows, trim(Z, 0.5))


def test_ties_by_hand():
    # trim 0.5: X -> [[3,0],[0,-4]], Y -> [[-2,2],[0,0]] (k = 2 of |Y| = 2, 2, 1, 1: both 2s)
    # total sign: [[1, 2],[0,-4]] -> [[+,+],[+,-]]; weights 1, 0.5
    # [0,0]: X agrees (3), Y disagrees -> 3/1; [0,1]: only Y (+2·0.5) -> 1; [1,0]: none -> 0; [1,1]: X (-4) -> -4
    got = run("ties", [X, Y], [1.0, 0.5], 0.5)
    assert torch.equal(got, torch.tensor([[3.0, 1.0], [0.0, -4.0]]))


def test_ties_frequency_sign_by_hand():
    # density 1: signs X [[+,-],[+,-]], Y [[-,+],[+,+]]; frequency votes [[0,0],[2,0]] -> all + (ties elect +)
    # [0,0]: Y? no, + agrees with X: 3; [0,1]: Y: 2; [1,0]: both: (0.5+1)/2; [1,1]: Y: 1
    got = run("ties", [X, Y], [1.0, 1.0], 1.0, "frequency")
    assert torch.equal(got, torch.tensor([[3.0, 2.0], [0.75, 1.0]]))


def test_magnitude_prune_and_task_arithmetic_by_hand():
    assert torch.equal(run("task_arithmetic", [X, Y], [1.0, -1.0]), X - Y)
    # density 0.25 keeps k = 1 entry of each: X's -4, Z's -2
    Z = torch.tensor([[-2.0, 1.5], [1.0, 0.5]])
    assert torch.equal(run("magnitude_prune", [X, Z], [2.0, 1.0], 0.25), torch.tensor([[-2.0, 0.0], [0.0, -8.0]]))


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.9, 1.0])
def test_deterministic_methods_equal_peft_merge_utils(density, sign):
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(24, 17, generator=g) for _ in range(3)]
    weights = [0.7, -0.4, 1.3]
    w = torch.tensor(weights)
    peft_ties = merge_utils.ties(deltas, w, density, sign)
    assert torch.allclose(run("ties", deltas, weights, density, sign), peft_ties, rtol=0, atol=1e-6)
    peft_mag = merge_utils.magnitude_prune(deltas, w, density)
    assert torch.allclose(run("magnitude_prune", deltas, weights, density), peft_mag, rtol=0, atol=1e-6)
    assert torch.allclose(run("task_arithmetic", deltas, weights), merge_utils.task_arithmetic(deltas, w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dare", "dare_ties"])
def test_dare_is_reproducible_per_seed_and_module(name):
    deltas = [torch.randn(40, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    first = run(name, deltas, [1.0, 1.0], 0.3, gen=module_generator(7, "q"))
    assert torch.equal(first, run(name, deltas, [1.0, 1.0], 0.3, gen=module_generator(7, "q")))
    assert not torch.equal(first, run(name, deltas, [1.0, 1.0], 0.3, gen=module_generator(8, "q")))
    assert not torch.equal(first, run(name, deltas, [1.0, 1.0], 0.3, gen=module_generator(7, "k")))


def test_dare_drop_rate_and_rescaling_are_right_statistically():
    # ΔW of all ones, 200k entries, p = 0.3: kept entries equal 1/p exactly; the kept count is
    # Binomial(n, p), within 5 standard deviations of n·p; the mean stays 1 within 5 s.d. of the estimate
    n, p = 200_000, 0.3
    ones = torch.ones(n)
    got = run("dare", [ones], [1.0], p, gen=module_generator(0, "m"))
    kept = got != 0
    assert torch.allclose(got[kept], torch.full_like(got[kept], 1 / p))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * p) < 5 * sd
    assert abs(float(got.double().mean()) - 1.0) < 5 * math.sqrt((1 - p) / p / n)


def test_density_one_drops_nothing():
    assert torch.equal(run("dare", [X], [2.0], 1.0, gen=module_generator(0, "m")), 2 * X)
    assert torch.equal(run("dare_ties", [X, Y], [1.0, 1.0], 1.0, gen=module_generator(0, "m")), run("ties", [X, Y], [1.0, 1.0]))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=300),
    fraction=st.floats(0.0, 1.0),
)
def test_kth_largest_magnitude_is_kthvalues(values, fraction):
    # the bit-pattern histogram must give exactly kthvalue's threshold (zeros, -0.0, infinities, ties, denormals)
    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    k = max(1, min(n, int(fraction * n)))
    threshold, reaching = kth_largest_magnitude(x, k)
    expected = torch.kthvalue(x.abs(), n - k + 1).values
    assert threshold.item() == expected.item()
    assert reaching == int((x.abs() >= expected).sum())


def test_kth_largest_magnitude_in_pieces_on_a_pool_equals_one_pass():
    x = torch.randn(3 * (1 << 19) + 17, generator=torch.Generator().manual_seed(5))
    with single_threaded() as pool:
        got = kth_largest_magnitude(x, 1_000_003, pool)
    expected = torch.kthvalue(x.abs(), x.numel() - 1_000_003 + 1).values
    assert got == (expected, 1_000_003)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bracket_scan_counts_and_gathers_as_torch_compares(dtype, scale):
    # ties at both ends, zeros, infinities, a NaN: the compiled float32 scan picks what torch's compares do
    a = torch.tensor([0.5, 0.25, 0.5, 0.0, 1.0, float("inf"), 0.75, float("nan"), 0.25, 0.3], dtype=dtype)
    low, high = torch.tensor(0.25 * scale, dtype=dtype), torch.tensor(0.5 * scale, dtype=dtype)
    x = (a * scale).abs()
    above, inside = Bracket(low, high, (_bits(low), _bits(high)) if dtype == torch.float32 else None).scan(a, scale)
    assert above == int((x > high).sum()) == 3
    assert torch.equal(inside, x[(x >= low) & (x <= high)])
    assert inside.numel() == 5  # 0.5, 0.25, 0.5, 0.25, 0.3 (scaled) in order
    _, unbounded = Bracket(low, None, (_bits(low), _bits(math.inf)) if dtype == torch.float32 else None).scan(a, scale)
    assert torch.equal(unbounded, x[x >= low])


@pytest.mark.parametrize("k", [1, 7, 300_000, 599_999, 600_000])
def test_kth_largest_magnitude_of_unlike_samples_falls_back_exactly(k):
    # mostly zeros and one repeated value: brackets can miss, and the answer must stay exact
    x = torch.zeros(600_000)
    x[1::9] = torch.linspace(-3, 3, x[1::9].numel())
    x[5::9] = 2.0
    expected = torch.kthvalue(x.abs(), x.numel() - k + 1).values
    assert kth_largest_magnitude(x, k) == (expected, int((x.abs() >= expected).sum()))


def test_della_keep_probabilities_follow_the_magnitude_rank_per_row():
    # one row |x| = 1..5 (shuffled): ranks 0..4, p = 0.5, ε = 0.2 -> keep probabilities 0.3, 0.4, 0.5, 0.6, 0.7;
    # a kept entry equals x / its probability; over 4000 seeds each entry's keep rate is within 5 s.d.
    x = torch.tensor([[3.0, -1.0, 5.0, -2.0, 4.0]])
    probability = torch.tensor([0.5, 0.3, 0.7, 0.4, 0.6])
    kept = torch.zeros(5)
    for seed in range(4000):
        got = run("della_linear", [x], [1.0], 0.5, gen=module_generator(seed, "m"), epsilon=0.2)[0]
        nonzero = got != 0
        assert torch.allclose(got[nonzero], (x[0] / probability)[nonzero])
        kept += nonzero
    sd = (4000 * probability * (1 - probability)).sqrt()
    assert bool(((kept - 4000 * probability).abs() < 5 * sd).all()), kept


def test_della_is_unbiased_and_elects_signs_as_ties():
    # E[MAGPRUNE(ΔW)] = ΔW: the mean over seeds of della_linear on one input approaches it
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    mean = sum(run("della_linear", [x], [1.0], 0.4, gen=module_generator(s, "m"), epsilon=0.1) for s in range(600)) / 600
    assert float((mean - x).abs().max()) < 0.35 * float(x.abs().max())
    # della = TIES's join on the MAGPRUNE'd inputs: same generator stream, same masks
    y = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    della = run("della", [x, y], [0.6, 0.9], 0.4, gen=module_generator(3, "m"), epsilon=0.1)
    gen = module_generator(3, "m")
    opts = MethodOptions(0.4, "total", 0, 0.1)
    kept = [select_della(d, opts, gen).apply(d, 0, 8) for d in (x, y)]
    assert torch.equal(della, get_method("ties").join(kept, [0.6, 0.9], opts))


def test_della_epsilon_window_is_checked():
    with pytest.raises(ArgumentError, match="epsilon must keep density"):
        get_method("della").options(density=0.9)  # 0.9 + the default 0.15 > 1
    with pytest.raises(ArgumentError, match="ties has no epsilon"):
        get_method("ties").options(density=0.5, epsilon=0.1)
    assert get_method("della").options(density=0.5).epsilon == 0.15


def test_density_zero_is_refused_not_nan():
    # PEFT 0.21's dare at density 0 divides by 0 (peft#3530); here density must be in (0, 1]
    with pytest.raises(ArgumentError, match=r"density must be in \(0, 1\]"):
        get_method("dare").options(density=0.0)
