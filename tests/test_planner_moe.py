"""The planner on PEFT ``target_parameters`` adapters: PEFT's stacked layout, wrapper nesting, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools
from loratools import spec
from loratools.adapter import LoraModule, RawAdapter, from_raw, stacked, unstacked
from loratools.errors import InvalidAdapterError
from loratools.validation import check_raw

P = spec.PREFIX + "model.layers.0.mlp.experts"


def test_stacked_layout_is_peft_s_hand_checked():
    """E = 2, r = 1: lora_A rows are experts in order; lora_B column j·E + e is expert e's column j."""
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (E·r, in): expert 0 = [1, 2], expert 1 = [3, 4]
    B = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])  # (out, r·E): column e is expert e
    A3, B3 = unstacked(A, B, rank=1)
    assert A3.tolist() == [[[1.0, 2.0]], [[3.0, 4.0]]]
    assert B3.tolist() == [[[10.0], [30.0], [50.0]], [[20.0], [40.0], [60.0]]]
    m = LoraModule(A3, B3, alpha=2.0, kind="parameter")  # s = 2
    assert m.delta_shape() == (2, 3, 2) and m.rank == 1 and m.experts == 2
    assert m.delta()[1].tolist() == [[120.0, 160.0], [240.0, 320.0], [360.0, 480.0]]  # 2·[20, 40, 60]ᵀ·[3, 4]
    assert all(torch.equal(x, y) for x, y in zip(stacked(m), (A, B), strict=True))
    # rank 2 keeps expert e's rows together: rows e·r + j
    A4, B4 = unstacked(torch.arange(8.0).reshape(4, 2), torch.arange(12.0).reshape(3, 4), rank=2)
    assert A4[1].tolist() == [[4.0, 5.0], [6.0, 7.0]] and B4[1].tolist() == [[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]]


def _raw(config: dict, tensors: dict[str, torch.Tensor]) -> RawAdapter:
    return RawAdapter("<test>", {"peft_type": "LORA", "r": 1, "lora_alpha": 1, **config}, tensors)


def test_wrapper_nesting_follows_definition_order():
    """Two wrappers on one module: the outer (no base_layer) is down_proj, the inner gate_up_proj."""
    tensors = {
        f"{P}.lora_A.weight": torch.ones(2, 3),
        f"{P}.lora_B.weight": torch.ones(4, 2),
        f"{P}.base_layer.lora_A.weight": torch.ones(2, 4),
        f"{P}.base_layer.lora_B.weight": torch.ones(6, 2),
    }
    raw = _raw({"target_modules": [], "target_parameters": ["down_proj", "gate_up_proj"]}, tensors)
    assert check_raw(raw) == []
    adapter = from_raw(raw)
    assert {n: m.delta_shape() for n, m in adapter.modules.items()} == {
        "model.layers.0.mlp.experts.down_proj": (2, 4, 3),
        "model.layers.0.mlp.experts.gate_up_proj": (2, 6, 4),
    }
    assert set(adapter.state_dict()) == set(tensors)
    assert adapter.peft_config()["target_parameters"] == ["down_proj", "gate_up_proj"]  # describes the modules: kept


def test_undecidable_or_inconsistent_wrappers_are_reported():
    two_unknown = _raw(
        {"target_modules": [], "target_parameters": ["w_in", "w_out"]},
        {f"{P}.lora_A.weight": torch.ones(2, 3), f"{P}.lora_B.weight": torch.ones(4, 2)},
    )
    assert [p.code for p in check_raw(two_unknown)] == ["target-parameter-ambiguous"]
    not_multiple = _raw(
        {"r": 3, "target_modules": [], "target_parameters": ["down_proj"]},
        {f"{P}.lora_A.weight": torch.ones(4, 3), f"{P}.lora_B.weight": torch.ones(4, 4)},
    )
    problems = check_raw(not_multiple)
    assert [p.code for p in problems] == ["rank-config-mismatch"] and "not a multiple of the declared r=3" in problems[0].message
    assert [f for f, _ in spec.config_problems({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": []})] == ["target_modules"]


def _fused_base(path: Path, model_type: str, shape: tuple[int, ...]) -> Path:
    path.mkdir()
    torch.manual_seed(0)
    save_file({"model.layers.0.mlp.experts.down_proj": torch.randn(shape)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def _down_adapter(experts: int = 2, out: int = 4, inp: int = 3) -> loratools.Adapter:
    torch.manual_seed(1)
    module = LoraModule(torch.randn(experts, 1, inp), torch.randn(experts, out, 1), 1.0, kind="parameter")
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [], "target_parameters": ["down_proj"]}
    return loratools.Adapter({"model.layers.0.mlp.experts.down_proj": module}, config)


def test_transposed_expert_parameters_get_the_transpose(tmp_path):
    """gpt-oss stores experts (E, in, out): ΔW[e]ᵀ is added (transformers 5.24 is_transposed=True)."""
    adapter = _down_adapter()
    base = _fused_base(tmp_path / "gptoss", "gpt_oss", (2, 3, 4))
    loratools.save(adapter, tmp_path / "a")
    result = loratools.merge(base, [tmp_path / "a"], out=tmp_path / "out")
    delta = adapter.modules["model.layers.0.mlp.experts.down_proj"].delta()
    key = "model.layers.0.mlp.experts.down_proj"
    got = load_file(result.out / "model.safetensors")[key] - load_file(base / "model.safetensors")[key]
    assert torch.allclose(got, delta.transpose(1, 2), atol=1e-6)


def test_refusals_name_the_module_and_the_reason(tmp_path):
    loratools.save(_down_adapter(), tmp_path / "a")
    wrong = _fused_base(tmp_path / "wrong", "qwen3_moe", (2, 3, 4))  # (E, in, out) where (E, out, in) is wanted
    report = loratools.validate(tmp_path / "a", base=wrong)
    assert [p.code for p in report.problems] == ["base-shape-mismatch"]
    assert "needs base tensor model.layers.0.mlp.experts.down_proj of shape [2, 4, 3], but it is [2, 3, 4]" in report.problems[0].message
    with pytest.raises(InvalidAdapterError, match="but it is"):
        loratools.merge(wrong, [tmp_path / "a"], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    more = _fused_base(tmp_path / "more", "qwen3_moe", (3, 4, 3))
    assert [p.code for p in loratools.validate(tmp_path / "a", base=more).problems] == ["base-shape-mismatch"]


def test_inspect_diff_and_convert_see_experts_as_blocks(tmp_path):
    adapter = _down_adapter()
    module = adapter.modules["model.layers.0.mlp.experts.down_proj"]
    dense = module.delta().double()
    row = loratools.summarize(adapter).modules[0]
    assert row.shape == (2, 4, 3) and abs(row.delta_norm - float(dense.norm())) < 1e-5
    (spectrum,) = loratools.spectra(adapter)
    expected = torch.cat([torch.linalg.svdvals(d) for d in dense]).sort(descending=True).values[:2]
    assert torch.allclose(torch.tensor(spectrum.singular_values[:2], dtype=torch.float64), expected, atol=1e-5)
    (same,) = loratools.diff(adapter, loratools.scale(adapter, 2.0)).modules
    assert abs(same.cosine - 1.0) < 1e-6 and abs(same.norm_a / same.norm_b - 0.5) < 1e-6
    loratools.save(adapter, tmp_path / "a")
    with pytest.raises(loratools.FormatError, match="kohya files cannot hold PEFT target_parameters"):
        loratools.convert(tmp_path / "a", tmp_path / "k.safetensors", to="kohya")


def test_square_fused_experts_without_model_type_are_refused(tmp_path):
    """(E, d, d) could hold ΔW[e] or ΔW[e]ᵀ; without config.json the planner refuses rather than guess."""
    loratools.save(_down_adapter(out=3, inp=3), tmp_path / "a")
    base = _fused_base(tmp_path / "b", "qwen3_moe", (2, 3, 3))
    assert loratools.validate(tmp_path / "a", base=base).ok
    (base / "config.json").unlink()
    (problem,) = loratools.validate(tmp_path / "a", base=base).problems
    assert problem.code == "base-layout-ambiguous" and "config.json" in problem.message
    gpt_oss = {
        "model.layers.0.mlp.experts.down_proj": torch.zeros(2, 3, 3),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.zeros(2, 6),
    }
    save_file(gpt_oss, base / "model.safetensors")
    assert loratools.validate(tmp_path / "a", base=base).ok  # the keys say gpt-oss: transposed
