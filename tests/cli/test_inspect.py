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
