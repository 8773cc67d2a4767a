"""`loratools validate`: verdicts, exit codes and JSON."""

import json

import pytest
from click.testing import CliRunner

from loratools.cli import main

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
