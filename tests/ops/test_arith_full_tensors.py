"""Arithmetic on adapters with full tensors sees the merge planner's meaning: carried exactly under weight 1, else refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loratools
from loratools import SpecError
from loratools.ops.arith import add, resize, scale, subtract

from ..merging.test_full_tensors import _adapter, _base, _merged_logits, _peft_logits


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = _base(tmp_path / "base", tied=False)
    mts = _adapter(base, tmp_path / "mts", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tokens = _adapter(base, tmp_path / "tokens", seed=2, target_modules=["v_proj"], trainable_token_indices=[3, 5])
    return base, mts, tokens


def test_scale_and_subtract_of_full_tensors_are_refused(inputs: tuple[Path, Path, Path]) -> None:
    _, mts, tokens = (inputs[0], loratools.load(inputs[1]), loratools.load(inputs[2]))
    with pytest.raises(SpecError, match="weight -1 has no exact meaning"):
        scale(mts, -1.0)  # base + A + scale(A, -1) would keep A's embedding: not the base
    with pytest.raises(SpecError, match="weight -1 has no exact meaning"):
        subtract(mts, tokens)
    with pytest.raises(SpecError, match="weight 0.5 has no exact meaning"):
        add(mts, tokens, weights=[0.5, 1.0])


def test_add_and_resize_outputs_load_in_peft_and_merge_like_the_inputs(inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, mts, tokens = inputs
    summed = tmp_path / "sum"
    loratools.save(add(loratools.load(mts), loratools.load(tokens)), summed)
    assert loratools.validate(summed, base=base).ok
    direct, via_sum = tmp_path / "direct", tmp_path / "via-sum"
    loratools.merge(base, [mts, tokens], out=direct)
    loratools.merge(base, [summed], out=via_sum)
    assert float((_merged_logits(direct) - _merged_logits(via_sum)).abs().max()) < 1e-4
    small = tmp_path / "small"
    loratools.save(resize(loratools.load(mts), 4)[0], small)  # rank 4 is the full rank: exact
    assert float((_peft_logits(base, [small]) - _peft_logits(base, [mts])).abs().max()) < 1e-4
    assert float((_peft_logits(base, [summed]) - _merged_logits(direct)).abs().max()) < 1e-4
    assert torch.isfinite(_peft_logits(base, [summed])).all()
