"""Splitting fused projections into diffusers' parts and fusing them back: exact by construction, checked by hand and by hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import LoraModule
from loratools.errors import FormatError
from loratools.formats.fusion import Row, fuse, split

QKV = Row("blocks.{i}.qkv", "equal", ("blocks.{i}.q", "blocks.{i}.k", "blocks.{i}.v"))
QKV_MLP = Row("blocks.{i}.linear1", "qkv_mlp", ("q", "k", "v", "mlp"))
ADALN = Row("final.adaLN", "adaln", ("norm_out",))


def test_split_by_hand():
    A = torch.tensor([[1.0, 2.0]])  # r = 1, in = 2
    B = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    q, k, v = split(LoraModule(A, B, 2.0), QKV, name="x")  # s = 2
    assert torch.equal(k.delta(), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))
    assert all(p.rank == 1 and p.alpha == 2.0 and p.A is A for p in (q, k, v))
    (swapped,) = split(LoraModule(A, B[:4], 1.0), ADALN, name="x")  # 4 rows = 2·in: (shift, scale) -> (scale, shift)
    assert torch.equal(swapped.B.flatten(), torch.tensor([3.0, 4.0, 1.0, 2.0]))


def test_linear1_rows_are_in_in_in_then_the_mlp():
    A, B = torch.randn(2, 4), torch.randn(3 * 4 + 16, 2)
    parts = split(LoraModule(A, B, 2.0), QKV_MLP, name="x")
    assert [p.B.shape[0] for p in parts] == [4, 4, 4, 16]
    with pytest.raises(FormatError, match="does not split"):
        split(LoraModule(A, torch.randn(12, 2), 2.0), QKV_MLP, name="x")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.floats(0.25, 8.0), st.integers(0, 2**31 - 1))
def test_split_then_fuse_is_bitwise_and_each_part_is_its_rows(rank, inp, out, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(torch.randn(rank, inp, generator=g), torch.randn(3 * out, rank, generator=g), alpha)
    parts = split(module, QKV, name="x")
    dense = module.delta()
    for j, part in enumerate(parts):
        assert torch.allclose(part.delta(), dense[j * out : (j + 1) * out], atol=1e-6, rtol=1e-6)
    back = fuse(parts, QKV, name="x")
    assert torch.equal(back.A, module.A) and torch.equal(back.B, module.B) and back.alpha == module.alpha


def test_parts_with_their_own_factors_fuse_block_diagonally():
    g = torch.Generator().manual_seed(6)
    parts = [LoraModule(torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g), a) for r, a in ((2, 2.0), (3, 6.0))]
    fused = fuse([*parts, None], QKV, name="qkv")  # scales 1 and 2: folded into B; v has no LoRA: zero rows
    assert fused.rank == 5 and fused.scale == 1.0
    dense = fused.delta()
    assert torch.equal(dense[:8], parts[0].delta()) and torch.allclose(dense[8:16], parts[1].delta(), atol=1e-6, rtol=0)
    assert torch.equal(dense[16:], torch.zeros(8, 8))
    same = fuse([parts[0], None, parts[0]], QKV, name="qkv")  # one shared A and scale: rank stays 2
    assert same.rank == 2 and torch.equal(same.delta()[8:16], torch.zeros(8, 8))


def test_dora_parts_are_refused_by_name():
    m = LoraModule(torch.ones(1, 2), torch.ones(6, 1), 1.0, magnitude=torch.ones(6))
    with pytest.raises(FormatError, match="double_blocks.0.img_attn.qkv is a fused"):
        split(m, QKV, name="double_blocks.0.img_attn.qkv")
