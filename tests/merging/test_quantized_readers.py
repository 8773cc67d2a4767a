"""Merging into GPTQ and AWQ bases: dequantized to bf16 only; ``--dtype keep`` refused in one line.

No GPTQ or AWQ package runs on this CPU machine, so the tiny Llama bases are written here by the
formats' definitions (the packers in ``tests/io/quant/test_gptq.py`` and ``test_awq.py``): every
linear weight of the decoder layers is replaced by 4-bit codes, zero points and float16 scales
fitted to it, and the float model holding exactly ``scale * (q - zero)`` is the dequantized base on
which PEFT's ``merge_and_unload`` is the reference.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loratools.cli.app import main
from tests.conftest import peft_adapter, tiny_llama
from tests.io.quant.test_awq import _pack as awq_pack
from tests.io.quant.test_gptq import _pack as gptq_pack

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 12, 40]])
GROUP = 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes (in, out), zeros (groups, out) in 1..15 and float16 scales fitted to ``w`` (out, in)."""
    x = w.T.reshape(-1, GROUP, w.shape[0])  # (groups, GROUP, out)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    scales = ((hi - lo) / 15).clamp(min=1e-4).to(torch.float16)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(1, 15).to(torch.int64)
    q = (torch.round(x / s[:, None]) + zeros[:, None]).clamp(0, 15).to(torch.int64)
    return q.reshape(-1, w.shape[0]), zeros, scales


def _dequantized(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` per input group, as (out, in): the formats' common definition."""
    groups = torch.arange(q.shape[0]) // GROUP
    return ((q - zeros[groups]).float() * scales.float()[groups]).T.contiguous()


def _write_base(path: Path, fmt: str) -> transformers.PreTrainedModel:
    """A tiny Llama stored as GPTQ (``fmt`` "gptq") or AWQ GEMM ("awq"); returns the dequantized float model."""
    model = tiny_llama(seed=0)
    stored: dict[str, torch.Tensor] = {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in state.items():
        module = key.removesuffix(".weight")
        if not module.endswith(LINEARS):
            stored[key] = value
            continue
        q, zeros, scales = _codes(value)
        with torch.no_grad():
            model.get_parameter(key).copy_(_dequantized(q, zeros, scales))
        if fmt == "gptq":  # format "gptq" (v1) stores each zero point minus one
            stored[f"{module}.qweight"], stored[f"{module}.qzeros"] = gptq_pack(q, zeros - 1, 4)
            stored[f"{module}.g_idx"] = (torch.arange(q.shape[0]) // GROUP).to(torch.int32)
        else:
            stored[f"{module}.qweight"], stored[f"{module}.qzeros"] = awq_pack(q), awq_pack(zeros)
        stored[f"{module}.scales"] = scales
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False, "format": "gptq"}
        if fmt == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
    )
    (path / "config.json").write_text(json.dumps(config))
    return model


def _logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_bf16_merge_matches_peft_on_the_dequantized_base(fmt: str, tmp_path: Path) -> None:
    dequantized = _write_base(tmp_path / "base", fmt)
    adapter = peft_adapter(tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(dequantized, adapter).merge_and_unload().eval()
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(adapter), "-o", str(out), "--dtype", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output
    written = load_file(out / "model.safetensors")
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in written)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = dict(reference.named_parameters())
    for layer in range(2):
        for name in LINEARS:  # merged or not, every quantized linear is written dequantized
            key = f"model.layers.{layer}.{'mlp' if name.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{name}.weight"
            assert written[key].dtype == torch.bfloat16
            assert torch.allclose(written[key].float(), merged[key].detach(), rtol=2**-8, atol=1e-7), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = _logits(reference)
    assert (_logits(loaded) - want).norm() / want.norm() < 0.01  # bf16 rounding only


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_keep_is_refused_in_one_line(fmt: str, tmp_path: Path) -> None:
    _write_base(tmp_path / "base", fmt)
    adapter = peft_adapter(tmp_path / "lora")
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(adapter), "-o", str(out), "--dtype", "keep", "--quiet"])
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot be requantized" in lines[0] and "--dtype bf16" in lines[0]
    assert fmt.upper() in lines[0] and not out.exists()


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_validate_base_understands_the_format(fmt: str, tmp_path: Path) -> None:
    _write_base(tmp_path / "base", fmt)
    adapter = peft_adapter(tmp_path / "lora")
    result = CliRunner().invoke(main, ["validate", str(adapter), "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output


def test_bitsandbytes_8bit_base_is_refused_by_name(tmp_path: Path) -> None:
    """bitsandbytes int8 (``SCB`` row scales) has no codec: refused naming the tensor and the method."""
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "base")
    stored = load_file(tmp_path / "base" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    w = stored.pop(key)
    scb = w.abs().amax(dim=1)
    stored[key] = torch.round(w / scb[:, None] * 127).to(torch.int8)
    stored[key.removesuffix(".weight") + ".SCB"] = scb
    save_file(stored, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    adapter = peft_adapter(tmp_path / "lora")
    args = ["merge", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "bf16", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and key in result.output and "quant_method 'bitsandbytes'" in result.output
    assert not (tmp_path / "out").exists()
