import torch

from loratools.adapter import Adapter, LoraModule
from loratools.linalg import frobenius_norm, inner
from loratools.ops.summary import summarize

from ..factories import random_adapter, random_module


def test_factored_norm_matches_dense():
    m = random_module(out=7, inp=5, rank=3)
    m2 = random_module(out=7, inp=5, rank=2, seed=3)
    dense, dense2 = m.B.double() @ m.A.double(), m2.B.double() @ m2.A.double()
    assert abs(frobenius_norm(m.B, m.A) - torch.linalg.matrix_norm(dense).item()) < 1e-9
    assert abs(inner(m.B, m.A, m2.B, m2.A) - torch.sum(dense * dense2).item()) < 1e-9


def test_hand_worked_norm():
    # B·A = [[1, 2], [0, 0]] scaled by alpha/r = 3: ‖ΔW‖_F = 3·sqrt(5)
    m = LoraModule(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]]), alpha=3.0)
    row = summarize(Adapter({"m": m}, {"peft_type": "LORA", "r": 1, "lora_alpha": 3, "target_modules": ["m"]})).modules[0]
    assert abs(row.delta_norm - 3 * 5**0.5) < 1e-12
    assert row.shape == (2, 2) and row.rank == 1 and row.scale == 3.0 and row.dtype == "F32"


def test_totals():
    summary = summarize(random_adapter(3, out=6, inp=5, rank=2))
    assert summary.num_params == 3 * (2 * 5 + 6 * 2)
    assert summary.num_bytes == summary.num_params * 4
    assert summary.targets == ["q_proj"] and summary.peft_type == "LORA"
    assert summary.spec_version.startswith("1.0")


def test_conv_summary_shape():
    conv = LoraModule(torch.randn(2, 3, 3, 3), torch.randn(8, 2, 1, 1), 2.0, kind="conv")
    row = summarize(Adapter({"c": conv}, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c"]})).modules[0]
    assert row.shape == (8, 3, 3, 3)
    assert abs(row.delta_norm - torch.linalg.vector_norm(conv.delta().double()).item()) < 1e-4
