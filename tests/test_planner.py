"""The planner is the one rule for fitting a base: validate --base passes exactly when merge runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loratools
from loratools.adapter import Adapter, LoraModule
from loratools.api import save
from loratools.cli import main
from loratools.io.checkpoint import open_checkpoint
from loratools.planner import plan

from .factories import random_module

Q = "model.layers.0.self_attn.q_proj"  # 16 x 16 in the tiny Llama
V = "model.layers.0.self_attn.v_proj"  # 8 x 16


def _adapter(modules: dict[str, LoraModule], extras: dict[str, torch.Tensor] | None = None, **config) -> Adapter:
    saved = sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in extras or {}})
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": sorted(modules), **config}
    if saved:
        base["modules_to_save"] = saved
    return Adapter(modules, base, dict(extras or {}))


def _bias(module: LoraModule, out: int) -> LoraModule:
    return LoraModule(module.A, module.B, module.alpha, bias=torch.ones(out))


CASES: dict[str, tuple[Adapter, set[str]]] = {
    "plain": (_adapter({Q: random_module(16, 16, 2), V: random_module(8, 16, 2, seed=1)}), set()),
    "unmatched module": (_adapter({"model.layers.9.self_attn.q_proj": random_module(16, 16, 2)}), {"base-unmatched"}),
    "shape mismatch": (_adapter({Q: random_module(16, 15, 2)}), {"base-shape-mismatch"}),
    "saved tensor of another shape": (
        _adapter({Q: random_module(16, 16, 2)}, {"base_model.model.model.norm.weight": torch.zeros(17)}),
        {"saved-shape-mismatch"},
    ),
    "head that grows the vocabulary without the embedding": (
        _adapter({Q: random_module(16, 16, 2)}, {"base_model.model.lm_head.weight": torch.zeros(65, 16)}),
        {"vocab-mismatch"},
    ),
    "classifier head missing from the base": (
        _adapter({Q: random_module(16, 16, 2)}, {"base_model.model.score.weight": torch.zeros(3, 16)}),
        {"saved-unmatched"},
    ),
    "saved head that fits": (
        _adapter({Q: random_module(16, 16, 2)}, {"base_model.model.lm_head.weight": torch.zeros(64, 16)}),
        set(),
    ),
    "lora_bias on a layer without bias": (_adapter({Q: _bias(random_module(16, 16, 2), 16)}, lora_bias=True), {"base-bias-unmatched"}),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("planner-cases")
    return {name: save(adapter, root / name.replace(" ", "-")) for name, (adapter, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_base_and_merge_agree(case, written, llama_base, tmp_path):
    _, codes = CASES[case]
    report = loratools.validate(written[case], base=llama_base)
    assert {p.code for p in report.errors} == codes, report.problems
    runner = CliRunner()
    checked = runner.invoke(main, ["validate", str(written[case]), "--base", str(llama_base)])
    merged = runner.invoke(main, ["merge", str(llama_base), str(written[case]), "-o", str(tmp_path / "out"), "--quiet"])
    assert (checked.exit_code == 0) == (merged.exit_code == 0) == (not codes), (checked.output, merged.output)
    assert (tmp_path / "out").exists() == (not codes)
    if codes:
        assert checked.exit_code == 1 and merged.exit_code == 3


def test_plan_lists_every_problem_of_every_adapter(llama_base):
    good, _ = CASES["plain"]
    bad = _adapter({"model.layers.9.self_attn.q_proj": random_module(16, 16, 2), Q: random_module(16, 15, 2)})
    result = plan(open_checkpoint(llama_base), [good, bad], labels=["good", "bad"])
    assert not result.ok
    assert sorted((p.code, p.where) for p in result.problems) == [
        ("base-shape-mismatch", f"bad: base_model.model.{Q}"),
        ("base-unmatched", "bad: base_model.model.model.layers.9.self_attn.q_proj"),
    ]


def test_plan_of_a_fitting_adapter_names_each_tensor_it_changes(llama_base):
    adapter, _ = CASES["plain"]
    result = plan(open_checkpoint(llama_base), [adapter], weights=[0.5])
    assert result.ok and sorted(result.edits) == [f"{Q}.weight", f"{V}.weight"]
    (term,) = result.edits[f"{Q}.weight"].terms
    assert term.weight == 0.5 and term.module == Q and not term.transposed and term.bias is None


def test_dora_module_sharing_its_tensor_is_a_conflict(llama_base):
    dora = LoraModule(torch.ones(2, 16), torch.ones(16, 2), 2.0, magnitude=torch.ones(16))
    adapter = _adapter({Q: dora, "layers.0.self_attn.q_proj": random_module(16, 16, 2)}, use_dora=True)
    result = plan(open_checkpoint(llama_base), [adapter])
    assert [p.code for p in result.problems] == ["dora-shared-tensor"]


def test_non_float_base_tensor_is_refused(tmp_path):
    save_file({"layer.weight": torch.zeros(4, 3, dtype=torch.int8)}, tmp_path / "base.safetensors")
    adapter = _adapter({"layer": random_module(4, 3, 2)})
    (problem,) = plan(open_checkpoint(tmp_path / "base.safetensors"), [adapter]).problems
    assert problem.code == "base-dtype-unsupported" and "I8" in problem.message
