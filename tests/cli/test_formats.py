"""`loratools convert`: --to gguf with a base, and --for refusing what a runtime cannot apply."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import loratools
from loratools.cli import main

from ..conftest import peft_adapter


@pytest.fixture()
def runner():
    return CliRunner()


def test_convert_to_gguf(runner, tmp_path, peft_dir, llama_base):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "a.gguf"
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "gguf", "--base", str(llama_base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert {t.name for t in gguf.GGUFReader(out).tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "gguf", "-o", str(tmp_path / "b.gguf")])
    assert result.exit_code == 2 and "--base" in result.output


def test_convert_for_refuses_dora_for_vllm(runner, tmp_path):
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    result = runner.invoke(main, ["convert", str(dora), "--to", "peft", "--for", "vllm", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3 and "vllm refuses DoRA" in result.output and not (tmp_path / "out").exists()


def test_convert_to_mlx_and_back_merges_bit_for_bit(runner, tmp_path, peft_dir, llama_base):
    """A PEFT-written adapter through mlx-lm's layout and back merges into the tiny Llama exactly as the original."""
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "mlx", "-o", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    result = runner.invoke(main, ["convert", str(tmp_path / "mlx"), "--to", "peft", "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    merged = []
    for name in ("orig", "back"):
        out = tmp_path / f"merged-{name}"
        loratools.merge(llama_base, [peft_dir if name == "orig" else tmp_path / "back"], out=out)
        tensors = {}
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        merged.append(tensors)
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
