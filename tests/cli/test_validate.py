"""`loratools validate`: verdicts, exit codes and JSON."""

import json

import pytest
from click.testing import CliRunner

from loratools.cli import main

from ..conftest import peft_adapter
from ..test_validation import write


@pytest.fixture()
def runner():
    return CliRunner()


def test_validate_valid_exit_0(runner, peft_dir, llama_base):
    result = runner.invoke(main, ["validate", str(peft_dir), "--base", str(llama_base)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_validate_invalid_exit_1_and_json(runner, tmp_path):
    path = write(tmp_path / "a", config={"peft_type": "LORA", "r": 8, "lora_alpha": 4, "target_modules": ["q_proj"]})
    result = runner.invoke(main, ["validate", str(path), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["valid"] is False and data["problems"][0]["code"] == "rank-config-mismatch"


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_validate_for_reports_resize_misscaling_and_none_after_for(runner, tmp_path):
    """The issue's case: a 14-tensor adapter after resize --energy 0.9 is mis-scaled in llama.cpp; --for all fixes it."""
    src = peft_adapter(tmp_path / "src", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    resized, fixed = tmp_path / "resized", tmp_path / "fixed"
    assert runner.invoke(main, ["resize", str(src), "--energy", "0.9", "-o", str(resized)]).exit_code == 0
    result = runner.invoke(main, ["validate", str(resized), "--for", "llama.cpp", "--for", "vllm", "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.output)["problems"]
    assert problems and {p["code"] for p in problems} == {"runtime-misscaled"}
    assert all(p["where"].endswith("[llama.cpp]") for p in problems)  # vLLM's lora_alpha/r holds for scale-1 modules
    assert runner.invoke(main, ["resize", str(src), "--energy", "0.9", "--for", "all", "-o", str(fixed)]).exit_code == 0
    result = runner.invoke(main, ["validate", str(fixed), "--for", "all"])
    assert result.exit_code == 0, result.output
    assert "valid, 0 warning(s)" in result.output


def test_validate_for_rslora_and_dora(runner, tmp_path):
    rs = peft_adapter(tmp_path / "rs", use_rslora=True)
    result = runner.invoke(main, ["validate", str(rs), "--for", "sglang"])
    assert result.exit_code == 1 and "sglang applies ΔW x 0.5" in result.output  # 8/4 instead of 8/2: 1/sqrt(4)
    assert runner.invoke(main, ["validate", str(rs), "--for", "vllm", "--for", "peft"]).exit_code == 0
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    result = runner.invoke(main, ["validate", str(dora), "--for", "vllm"])
    assert result.exit_code == 1 and "runtime-unsupported" in result.output and "DoRA" in result.output
