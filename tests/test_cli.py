import json

import pytest
from click.testing import CliRunner

import loratools
from loratools.cli import main

from .test_validate import write


@pytest.fixture()
def runner():
    return CliRunner()


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and loratools.__version__ in result.output


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


def test_inspect_table_and_json(runner, peft_dir):
    result = runner.invoke(main, ["inspect", str(peft_dir)])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output and "parameters:" in result.output
    data = json.loads(runner.invoke(main, ["inspect", str(peft_dir), "--json"]).output)
    assert len(data["modules"]) == 4 and data["modules"][0]["rank"] == 4 and data["modules"][0]["scale"] == 2.0
    assert data["num_params"] == 2 * (4 * 16 + 16 * 4) + 2 * (4 * 16 + 8 * 4)


def test_errors_are_one_line_without_traceback(runner, tmp_path):
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "no such file" in lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_invalid_adapter_on_inspect_names_tensor(runner, tmp_path):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    import torch

    path = write(tmp_path / "a", {f"{q}.lora_A.weight": torch.ones(2, 16)})
    result = runner.invoke(main, ["inspect", str(path)])
    assert result.exit_code == 3 and q in result.stderr and "lora_B" in result.stderr


def test_debug_shows_traceback(runner, tmp_path):
    result = runner.invoke(main, ["--debug", "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_help_has_examples(runner):
    for command in ("validate", "inspect"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "loratools " + command in result.output
