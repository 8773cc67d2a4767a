"""`loratools convert`: --to gguf with a base, and --for refusing what a runtime cannot apply."""

import pytest
from click.testing import CliRunner

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
