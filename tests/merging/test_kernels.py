"""The float32 merge kernel: row-block streaming equals the one-shot result bit for bit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.compute import single_threaded
from loratools.merging import kernels


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 24),
    rank=st.integers(1, 4),
    transposed=st.booleans(),
    dora=st.booleans(),
    block=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_row_blocks_equal_the_whole_tensor_bit_for_bit(
    rows: int, cols: int, rank: int, transposed: bool, dora: bool, block: int, seed: int
) -> None:
    """Streaming in row blocks (on a thread pool) gives exactly the one-shot result, for any block size."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    B, A = (
        (torch.randn(cols, rank, generator=gen), torch.randn(rank, rows, generator=gen))
        if transposed
        else (torch.randn(rows, rank, generator=gen), torch.randn(rank, cols, generator=gen))
    )
    magnitude = torch.rand(cols if transposed else rows, generator=gen) + 0.5 if dora else None
    edit = kernels.Kernel("w", (kernels.RowTerm(B, A, 0.75, transposed),), magnitude)
    whole = edit.rows(W, 0, rows).to(torch.bfloat16)
    streamed = torch.empty_like(W)
    old = kernels._BLOCK
    kernels._BLOCK = block * cols
    try:
        with single_threaded() as pool:
            edit.transform(torch.device("cpu"), pool)(W, streamed)
    finally:
        kernels._BLOCK = old
    assert torch.equal(streamed, whole)
