"""The float32 merge kernel and a method's combination of terms: row-block streaming equals the one-shot result bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.compute import single_threaded
from loratools.merging import kernels
from loratools.merging.combination import Combination, StreamedTerm
from loratools.merging.terms import RowTerm
from loratools.methods import MethodOptions, get_method, module_generator


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 24),
    rank=st.integers(1, 4),
    transposed=st.booleans(),
    dora=st.booleans(),
    in_axis=st.booleans(),
    block=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_row_blocks_equal_the_whole_tensor_bit_for_bit(
    rows: int, cols: int, rank: int, transposed: bool, dora: bool, in_axis: bool, block: int, seed: int
) -> None:
    """Streaming in row blocks (on a thread pool) gives exactly the one-shot result, for any block size."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    B, A = (
        (torch.randn(cols, rank, generator=gen), torch.randn(rank, rows, generator=gen))
        if transposed
        else (torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen))
    )
    per_row = transposed == in_axis  # out-axis norms run along stored rows unless transposed; in-axis ones the other way
    magnitude = torch.rand(rows if per_row else cols, generator=gen) + 0.5 if dora else None
    edit = kernels.Kernel("w", (RowTerm(B, A, 0.75, transposed),), magnitude, magnitude_axis="in" if in_axis else "out")
    whole = edit.rows(W, 0, rows).to(torch.bfloat16)
    streamed = torch.empty_like(W)
    old = kernels.BLOCK
    kernels.BLOCK = block * cols
    try:
        with single_threaded() as pool:
            edit.transform(torch.device("cpu"), pool)(W, streamed)
    finally:
        kernels.BLOCK = old
    assert torch.equal(streamed, whole)


def test_dora_axes_by_hand() -> None:
    """W + ΔW = [[3, 1], [4, 1]] (W = [[3, 0], [4, 1]], ΔW = B·A with B = [[1], [0]], A = [[0, 1]]), m = (10, 2).

    Per input feature (kohya/LyCORIS wd_on_output=False): column norms 5 and √2, W' = [[6, √2], [8, √2]].
    Per output feature (PEFT): row norms √10 and √17, W' = [[30/√10, 10/√10], [8/√17, 2/√17]].
    Stored transposed (fan_in_fan_out), the in-axis norms run along the stored rows: W'ᵀ.
    """
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    B, A, m = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([10.0, 2.0])
    eps = torch.finfo(torch.float32).eps
    r2, r10, r17 = 2**0.5, 10**0.5, 17**0.5
    in_axis = kernels.Kernel("w", (RowTerm(B, A, 1.0),), m, magnitude_axis="in").rows(W, 0, 2)
    assert torch.allclose(in_axis, torch.tensor([[3 * 10 / (5 + eps), 2 / (r2 + eps)], [8 / (1 + eps / 5), r2]]), atol=1e-6)
    out_axis = kernels.Kernel("w", (RowTerm(B, A, 1.0),), m).rows(W, 0, 2)
    assert torch.allclose(out_axis, torch.tensor([[30 / r10, 10 / r10], [8 / r17, 2 / r17]]), atol=1e-6)
    stored = kernels.Kernel("w", (RowTerm(B, A, 1.0, True),), m, magnitude_axis="in")
    assert torch.allclose(stored.rows(W.T.contiguous(), 0, 2), in_axis.T, atol=1e-6)


def test_in_axis_conv_norms_each_input_channel_over_rows_and_kernel() -> None:
    """A conv (out 2, in 2, 1 x 2 kernel) stored as (2, 4) rows: channel c holds columns 2c, 2c+1."""
    W = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 4.0, 3.0, 1.0]])  # channel 0: ‖(1, 2, 2, 4)‖ = 5; channel 1: ‖(0, 1, 3, 1)‖ = √11
    zero = RowTerm(torch.zeros(2, 1), torch.zeros(1, 4), 1.0)
    got = kernels.Kernel("w", (zero,), torch.tensor([5.0, 11**0.5]), magnitude_axis="in").rows(W, 0, 2)
    assert torch.allclose(got, W, atol=1e-6)  # m equal to the norms: unchanged
    got = kernels.Kernel("w", (zero,), torch.tensor([10.0, 11**0.5]), magnitude_axis="in").rows(W, 0, 2)
    assert torch.allclose(got[:, :2], 2 * W[:, :2], atol=1e-5) and torch.allclose(got[:, 2:], W[:, 2:], atol=1e-6)


def test_in_axis_dora_weight_interpolates_the_full_result() -> None:
    """Weight 0.5 on the by-hand case: W + 0.5·(W' − W) with W' = [[6, √2], [8, √2]] (ΔW at full scale inside W'),
    i.e. [[4.5, √2/2], [6, 1 + (√2 − 1)/2]] (ComfyUI's strength)."""
    W = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    B, A, m = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([10.0, 2.0])
    r2 = 2**0.5
    got = kernels.Kernel("w", (RowTerm(B, A, 1.0),), m, magnitude_axis="in", dora_weight=0.5).rows(W, 0, 2)
    assert torch.allclose(got, torch.tensor([[4.5, r2 / 2], [6.0, 1 + (r2 - 1) / 2]]), atol=1e-6)


def test_random_methods_draw_in_the_modules_orientation_whatever_the_layout():
    # a fan_in_fan_out base stores (B·A)ᵀ: DARE still drops the entries add drops on B·A (same seed, same module)
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    combination = Combination(get_method("dare"), MethodOptions(0.5, seed=1), (0,), (1.0,), "m")
    cpu = torch.device("cpu")
    plain = combination.term((RowTerm(B, A, 1.0),), (6, 5), "k", cpu, None).rows(0, 6)
    stored = combination.term((RowTerm(B, A, 1.0, True),), (5, 6), "k", cpu, None).rows(0, 5)
    assert torch.equal(stored, plain.T)
    assert torch.equal(plain, get_method("dare").combine([B @ A], [1.0], MethodOptions(0.5, seed=1), module_generator(1, "m")))


def _stored_reference(method: str, options: MethodOptions, parts, weights) -> torch.Tensor:
    """The method on each input's whole ΔWᵢ formed as the merge forms it (first term's (B·A)·s, then each further term added)."""
    deltas = []
    for terms in parts:
        delta = (terms[0][0] @ terms[0][1]).mul_(terms[0][2])
        for B, A, s in terms[1:]:
            delta.add_((B @ A).mul_(s))
        deltas.append(delta)
    return get_method(method).combine(deltas, weights, options)


@pytest.mark.parametrize(
    ("method", "sign", "density", "bf16"),
    [
        ("ties", "total", 0.5, False),
        ("ties", "frequency", 0.3, False),
        ("magnitude_prune", "total", 0.2, False),
        ("ties", "total", 0.5, True),
    ],
)
def test_magnitude_methods_from_factors_equal_the_method_on_whole_deltas(method, sign, density, bf16):
    """CPU TIES/magnitude pruning never form ΔWᵢ whole (StreamedTerm): thresholds from blocks computed and dropped,
    the join recomputing them; the result equals the method on whole ΔWᵢ bit for bit, in any row blocks on a pool.
    bf16-valued factors make magnitudes tie at the threshold, so the cut among tied entries is exercised too."""
    g = torch.Generator().manual_seed(4)
    rows, cols, rank = 700, 520, 8  # 364,000 entries: above the sampled-bracket size

    def factor(*shape):
        t = torch.randn(*shape, generator=g)
        return t.bfloat16().float() if bf16 else t

    # input 0: one term; input 1: two terms on the same tensor (a fused tensor's parts)
    parts = [
        [(factor(rows, rank) * 0.1, factor(rank, cols), 0.5)],
        [(factor(rows, rank), factor(rank, cols), 0.25), (factor(rows, 2), factor(2, cols), 2.0)],
    ]
    if bf16:
        parts = [[(B.round(decimals=1), A.round(decimals=1), s) for B, A, s in terms] for terms in parts]
    options = MethodOptions(density, sign)
    weights = (1.0, 0.7)
    terms = tuple(RowTerm(B, A, s) for terms in parts for B, A, s in terms)
    combination = Combination(get_method(method), options, (0, 1, 1), (1.0, 0.7, 0.7), "m")
    with single_threaded() as pool:
        term = combination.term(terms, (rows, cols), "k", torch.device("cpu"), pool)
        assert isinstance(term, StreamedTerm)
        if bf16:
            assert any(k.strict for k in term.kept)  # ties at the threshold: the cut was needed
        blocks = [term.rows(r0, min(rows, r0 + 97)).clone() for r0 in range(0, rows, 97)]
    assert torch.equal(torch.cat(blocks), _stored_reference(method, options, parts, weights))
