"""The CLI on PEFT variants: a refusal is one line with exit 3, an overridden fan_in_fan_out a warning on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from loratools import Adapter, save
from loratools.cli import main

from ..factories import random_module

C_PROJ = "transformer.h.0.attn.c_proj"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _files(tmp_path: Path, **config: object) -> tuple[Path, Path]:
    """A GPT-2 model directory with a square Conv1D c_proj, and an adapter on it with ``config``."""
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{C_PROJ}.weight": torch.zeros(8, 8)}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["c_proj"], **config}
    adapter = Adapter({C_PROJ: random_module(8, 8, 2)}, fields)
    return base, save(adapter, tmp_path / "adapter")


def test_overridden_fan_in_fan_out_merges_with_a_warning(tmp_path: Path) -> None:
    base, adapter = _files(tmp_path, fan_in_fan_out=False)
    code, stdout, stderr = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "out"))
    assert code == 0 and stderr.strip().startswith("warning: fan_in_fan_out: fan_in_fan_out is false but") and "merged 1 of 1" in stdout


def test_alora_merge_is_one_line_exit_3_and_validate_warns(tmp_path: Path) -> None:
    base, adapter = _files(tmp_path, fan_in_fan_out=True, alora_invocation_tokens=[5])
    code, _, stderr = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "out"))
    assert code == 3 and len(stderr.split()) > 1 and len(stderr.strip().splitlines()) == 1 and "alora_invocation_tokens is [5]" in stderr
    assert not (tmp_path / "out").exists()
    code, stdout, _ = _run("validate", str(adapter))
    assert code == 0 and "1 warning(s)" in stdout
    code, _, _ = _run("validate", str(adapter), "--base", str(base))
    assert code == 1
