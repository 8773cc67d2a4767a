import json

import pytest
from click.testing import CliRunner

import loratools
from loratools.cli import main

from ..test_validation import write


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


def _bad_inputs(tmp_path):
    """One broken adapter per kind of bad input, each with the text its error line must carry."""
    import torch
    from safetensors.torch import save_file

    from loratools import save

    from ..factories import random_adapter

    cases = {}
    pickled = write(tmp_path / "pickle")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    cases["pickle"] = (pickled, "pickle")
    truncated = write(tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    cases["truncated"] = (truncated, "truncated")
    cases["bad-json"] = (write(tmp_path / "json", config="{"), "adapter_config.json")
    cases["future"] = (write(tmp_path / "future", metadata={"format": "pt", "loratools.spec_version": "9.0"}), "9.0")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, loha)
    cases["loha"] = (loha, "LoHa")
    save(random_adapter(1), tmp_path / "sum")
    data = bytearray((tmp_path / "sum" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "sum" / "adapter_model.safetensors").write_bytes(bytes(data))
    cases["checksum"] = (tmp_path / "sum", "sha256")
    return cases


@pytest.mark.parametrize("case", ["pickle", "truncated", "bad-json", "future", "loha", "checksum"])
def test_every_bad_input_is_one_line_naming_the_file(runner, tmp_path, case):
    path, needle = _bad_inputs(tmp_path)[case]
    for command in ("inspect", "resize"):
        args = [command, str(path)] + (["--rank", "1", "-o", str(tmp_path / "out")] if command == "resize" else [])
        result = runner.invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 3, (command, result.stderr)
        assert len(lines) == 1 and needle in lines[0] and str(tmp_path) in lines[0], lines
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert runner.invoke(main, ["validate", str(path)]).exit_code == 1
