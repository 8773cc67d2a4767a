"""Factored SVD and rank criteria against dense references and hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.linalg import choose_rank, factored_svd, frobenius_norm, inner, kept_energy, reduced, singular_values, tail_errors

from .factories import GiB, in_subprocess

SETTINGS = settings(max_examples=40, deadline=None)


def factors(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


@SETTINGS
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    r=st.integers(1, 6),
    s=st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3),
    seed=st.integers(0, 999),
)
def test_factored_svd_matches_dense(m, n, r, s, seed):
    B, A = factors(m, n, r, seed)
    dense = s * (B @ A)
    svd = factored_svd(B, A, s)
    t = len(svd.S)
    U, S, Vh = svd.truncate(t)
    assert t == min(m, n, r)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:t], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U.T @ U, torch.eye(t, dtype=U.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(t, dtype=U.dtype), rtol=0, atol=1e-9)


def test_factored_svd_float32_factors_compute_in_float32():
    B, A = (t.float() for t in factors(40, 30, 5, 1))
    svd = factored_svd(B, A, 0.5)
    assert svd.B.dtype == torch.float32 and svd.S.dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in svd.truncate(3))
    dense = torch.linalg.svdvals(0.5 * (B.double() @ A.double()))[:5]
    torch.testing.assert_close(svd.S, dense, rtol=1e-5, atol=0)


@SETTINGS
@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 6), k=st.integers(1, 6), seed=st.integers(0, 999))
def test_balanced_factors_give_the_dense_truncation(m, n, r, k, seed):
    B, A = factors(m, n, r, seed)
    U, S, Vh = torch.linalg.svd(B @ A)
    k = min(k, m, n, r)
    Bk, Ak = factored_svd(B, A).factors(k)
    torch.testing.assert_close(Bk @ Ak, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], rtol=1e-8, atol=1e-8 * float(S[0]))
    torch.testing.assert_close(torch.linalg.vector_norm(Bk, dim=0), S[:k].sqrt(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(torch.linalg.vector_norm(Ak, dim=1), S[:k].sqrt(), rtol=1e-8, atol=1e-8)


def test_rank_deficient_factors_give_zero_columns_not_nan():
    B = torch.zeros(5, 3, dtype=torch.float64)
    B[:, 0] = 1.0  # rank one
    A = torch.ones(3, 4, dtype=torch.float64)
    svd = factored_svd(B, A)
    assert svd.S[0] == pytest.approx(math.sqrt(20)) and float(svd.S[1:].abs().max()) < 1e-12
    Bk, Ak = svd.factors(3)
    assert torch.isfinite(Bk).all() and torch.isfinite(Ak).all()
    torch.testing.assert_close(Bk @ Ak, B @ A)
    zero = factored_svd(torch.zeros(5, 2), torch.zeros(2, 4)).factors(1)
    assert [float(t.abs().sum()) for t in zero] == [0.0, 0.0]


def test_conv_factors_are_flattened():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 2, 2, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    dense = B.reshape(5, 3) @ A.reshape(3, 16)
    torch.testing.assert_close(singular_values(B, A).float(), torch.linalg.svdvals(dense)[:3], rtol=1e-5, atol=1e-5)


def test_singular_values_take_abs_scale_and_agree_with_norm():
    B, A = factors(7, 6, 3, 2)
    S = singular_values(B, A, -2.0)
    torch.testing.assert_close(S, torch.linalg.svdvals(-2.0 * B @ A)[:3])
    assert math.isclose(float(S.square().sum()) ** 0.5, 2.0 * frobenius_norm(B, A), rel_tol=1e-12)


def test_rank_one_by_hand():
    # B·A = [[2],[0]]·[[3, 4]] = [[6, 8], [0, 0]] has the single singular value sqrt(36 + 64) = 10.
    S = singular_values(torch.tensor([[2.0], [0.0]]), torch.tensor([[3.0, 4.0]]))
    assert S.tolist() == pytest.approx([10.0])


# σ = (3, 2, 1): σ² = (9, 4, 1), total 14.  Kept energy 9/14, 13/14, 1; errors sqrt(5/14), sqrt(1/14), 0.
SIGMA = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)


def test_kept_energy_and_tail_errors_by_hand():
    assert kept_energy(SIGMA).tolist() == pytest.approx([9 / 14, 13 / 14, 1.0])
    assert tail_errors(SIGMA).tolist() == pytest.approx([math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0])


@pytest.mark.parametrize(
    ("criterion", "value", "k"),
    [
        ("rank", 2, 2),
        ("rank", 9, 3),
        ("energy", 0.6, 1),
        ("energy", 0.65, 2),
        ("energy", 13 / 14, 2),
        ("energy", 0.93, 3),
        ("energy", 1.0, 3),
        ("max_rel_error", 0.6, 1),
        ("max_rel_error", 0.5, 2),
        ("max_rel_error", 0.2, 3),
        ("max_rel_error", 0.0, 3),
        ("sv_ratio", 1.0, 1),
        ("sv_ratio", 1.5, 2),
        ("sv_ratio", 2.9, 2),
        ("sv_ratio", 3.0, 3),
    ],
)
def test_choose_rank_by_hand(criterion, value, k):
    assert choose_rank(SIGMA, criterion, value) == k


def test_zero_delta_gets_rank_one():
    assert choose_rank(torch.zeros(4, dtype=torch.float64), "energy", 0.9) == 1
    assert kept_energy(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert tail_errors(torch.zeros(2)).tolist() == [0.0, 0.0]


sigmas = st.lists(st.floats(1e-3, 100), min_size=1, max_size=12).map(lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


@SETTINGS
@given(S=sigmas, energy=st.floats(0.01, 1.0))
def test_energy_picks_the_smallest_rank_that_meets_it(S, energy):
    k = choose_rank(S, "energy", energy)
    kept = kept_energy(S)
    assert kept[k - 1] >= energy - 1e-12
    assert k == 1 or kept[k - 2] < energy - 1e-12


@SETTINGS
@given(S=sigmas, bound=st.floats(0.0, 0.99))
def test_max_rel_error_picks_the_smallest_rank_that_meets_it(S, bound):
    k = choose_rank(S, "max_rel_error", bound)
    err = tail_errors(S)
    assert err[k - 1] <= bound + 1e-12
    assert k == 1 or err[k - 2] > bound + 1e-12


@SETTINGS
@given(S=sigmas, ratio=st.floats(1.0, 1e4))
def test_sv_ratio_keeps_exactly_the_large_values(S, ratio):
    k = choose_rank(S, "sv_ratio", ratio)
    threshold = float(S[0]) / ratio
    assert all(float(s) >= threshold * (1 - 1e-12) for s in S[:k])
    assert all(float(s) < threshold * (1 - 1e-12) for s in S[k:])


def test_reduced_by_hand():
    B = torch.tensor([[1.0, 2.0, 3.0]])  # (1, 3): rank 3 > min(1, 2)
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (3, 2)
    B2, A2 = reduced(B, A)
    assert B2.tolist() == [[1.0]] and A2.tolist() == [[4.0, 5.0]]  # B·A = [1 + 3, 2 + 3]
    Bt, At = reduced(A, B)  # (3, 1) x (1, 3): rank 1 <= min(3, 3) stays as it is
    assert torch.equal(Bt, A) and torch.equal(At, B)
    B3, A3 = reduced(torch.ones(3, 4), torch.ones(4, 2))  # rank 4 > min(3, 2), m > n: (B·A, I_2)
    assert B3.tolist() == [[4.0, 4.0]] * 3 and torch.equal(A3, torch.eye(2))


@SETTINGS
@given(m=st.integers(1, 6), n=st.integers(1, 6), r1=st.integers(1, 12), r2=st.integers(1, 12), seed=st.integers(0, 999))
def test_inner_and_norms_with_ranks_above_the_shapes_match_dense(m, n, r1, r2, seed):
    B1, A1 = factors(m, n, r1, seed)
    B2, A2 = factors(m, n, r2, seed + 1)
    assert math.isclose(inner(B1, A1, B2, A2), float(torch.sum((B1 @ A1) * (B2 @ A2))), rel_tol=1e-9, abs_tol=1e-9)
    torch.testing.assert_close(singular_values(B1, A1), torch.linalg.svdvals(B1 @ A1)[: min(m, n, r1)], rtol=1e-9, atol=1e-9)


def test_rank_20000_adapter_inspects_under_1_gib(tmp_path):
    code = f"""
    import torch
    from loratools import load, save
    from loratools.adapter import Adapter, LoraModule
    from loratools.ops.diff import diff
    from loratools.ops.spectrum import spectra
    from loratools.ops.summary import summarize
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20000, 64, generator=g).half()  # 5 MB of fp16 claiming rank 20000 on a 64 x 64 ΔW
    B = torch.randn(64, 20000, generator=g).half()
    module = LoraModule(A, B, 20000.0, False, "linear")
    path = save(Adapter({{"model.layers.0.q_proj": module}}, {{}}), {str(tmp_path / "big")!r})
    adapter = load(path)
    row = summarize(adapter).modules[0]
    spectrum = spectra(adapter)[0]
    cos = diff(adapter, adapter).modules[0].cosine
    dense = B.double() @ A.double()
    result = {{"rank": row.rank, "norm": row.delta_norm, "dense_norm": float(dense.norm()), "cos": cos}}
    result["n_sv"] = len(spectrum.singular_values)
    """
    result, rss = in_subprocess(code)
    assert result["rank"] == 20000 and result["n_sv"] == 64  # at most min(out, in) singular values
    assert math.isclose(result["norm"], result["dense_norm"], rel_tol=1e-6)
    assert math.isclose(result["cos"], 1.0, rel_tol=1e-9)
    assert rss < GiB
    print(f"rank-20000 inspect: peak RSS {rss / 2**20:.0f} MiB")
