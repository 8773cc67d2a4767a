"""`loratools inspect`: the module table and JSON."""

import json

import pytest
import torch
from click.testing import CliRunner

from loratools.cli import main

from ..test_validation import write


@pytest.fixture()
def runner():
    return CliRunner()


def test_inspect_table_and_json(runner, peft_dir):
    result = runner.invoke(main, ["inspect", str(peft_dir)])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output and "parameters:" in result.output
    data = json.loads(runner.invoke(main, ["inspect", str(peft_dir), "--json"]).output)
    assert len(data["modules"]) == 4 and data["modules"][0]["rank"] == 4 and data["modules"][0]["scale"] == 2.0
    assert data["num_params"] == 2 * (4 * 16 + 16 * 4) + 2 * (4 * 16 + 8 * 4)


def test_invalid_adapter_on_inspect_names_tensor(runner, tmp_path):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    path = write(tmp_path / "a", {f"{q}.lora_A.weight": torch.ones(2, 16)})
    result = runner.invoke(main, ["inspect", str(path)])
    assert result.exit_code == 3 and q in result.stderr and "lora_B" in result.stderr


def test_inspect_of_a_quantized_base_shows_its_codecs(tmp_path):
    from ..merging.test_quantized import _fp8_base

    base = _fp8_base(tmp_path / "base")
    result = CliRunner().invoke(main, ["inspect", str(base), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtypes"] == {"F32": 21, "F8_E4M3": 14} and report["model_type"] == "llama"  # 14 scales + 7 float tensors
    (label,) = report["quantization"]["formats"]
    assert label == "FP8 e4m3, 16x16 block scales (F32 weight_scale_inv)"
    assert report["quantization"]["formats"][label] == {"codec": "fp8-block", "requantizable": True, "tensors": 14}
    text = CliRunner().invoke(main, ["inspect", str(base)]).stdout
    assert "14 tensors FP8 e4m3, 16x16 block scales" in text and "requantized by merge --dtype keep" in text
