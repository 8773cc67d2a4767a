"""Merging into bitsandbytes 4-bit bases (QLoRA): dequantized to bf16 only; ``--dtype keep`` refused in one line.

The bases are what transformers itself writes: a tiny Llama loaded with a ``BitsAndBytesConfig``
(bitsandbytes quantizes every decoder linear on the CPU) and ``save_pretrained``.  The reference
is transformers' own ``dequantize()`` of that checkpoint reloaded, merged by PEFT.
"""

from __future__ import annotations

import copy
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

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 12, 40]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = {"nf4-double": ("nf4", True), "fp4": ("fp4", False)}
Q0 = "model.layers.0.self_attn.q_proj.weight"


def _key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'mlp' if name.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{name}.weight"


@pytest.fixture(scope="module", params=list(KINDS))
def bnb_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    """(directory of a bnb 4-bit tiny Llama as transformers saves it, its dequantized float model by transformers)."""
    quant_type, double = KINDS[request.param]
    root = tmp_path_factory.mktemp(f"bnb-{request.param}")
    tiny_llama(seed=0).save_pretrained(root / "float")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = transformers.LlamaForCausalLM.from_pretrained(root / "float", quantization_config=config, device_map="cpu")
        quantized.save_pretrained(root / "base")
        reloaded = transformers.LlamaForCausalLM.from_pretrained(root / "base", device_map="cpu")
        dequantized = reloaded.dequantize().eval()
    assert type(reloaded.get_submodule(Q0.removesuffix(".weight"))).__name__ == "Linear"  # dequantize() replaced Linear4bit
    return root / "base", dequantized


def _logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _merge(base: Path, adapter: Path, out: Path, dtype: str) -> None:
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out), "--dtype", dtype, "--quiet"])
    assert result.exit_code == 0, result.output


def test_bf16_merge_matches_peft_on_the_dequantized_base(bnb_base: tuple[Path, transformers.PreTrainedModel], tmp_path: Path) -> None:
    base, dequantized = bnb_base
    float_base = {k: v.detach().clone() for k, v in dequantized.state_dict().items()}
    adapter = peft_adapter(tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(dequantized), adapter).merge_and_unload().eval()  # merges in place
    merged = {k: v.detach() for k, v in reference.named_parameters()}
    _merge(base, adapter, tmp_path / "fp32", "fp32")
    exact = load_file(tmp_path / "fp32" / "model.safetensors")
    _merge(base, adapter, tmp_path / "bf16", "bf16")
    written = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any(".weight." in k for k in written)  # absmax, quant_map, nested_*, quant_state dropped
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    for layer in range(2):
        for name in LINEARS:  # merged or not, every quantized linear is written dequantized
            key = _key(layer, name)
            assert written[key].dtype == torch.bfloat16 and written[key].shape == merged[key].shape
            assert torch.allclose(written[key].float(), merged[key], rtol=2**-8, atol=1e-7), key
            # --dtype fp32: transformers' dequantize (+ ΔW as PEFT adds it, for targeted modules), bit for bit
            assert torch.equal(exact[key].view(torch.int32), merged[key].view(torch.int32)), key
            if name in ("k_proj", "o_proj", "gate_proj", "up_proj"):
                assert torch.equal(exact[key].view(torch.int32), float_base[key].view(torch.int32)), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    want = _logits(reference)
    assert (_logits(loaded) - want).norm() / want.norm() < 0.01  # bf16 rounding only


def test_keep_is_refused_in_one_line(bnb_base: tuple[Path, transformers.PreTrainedModel], tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "lora")
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(bnb_base[0]), str(adapter), "-o", str(out), "--dtype", "keep", "--quiet"])
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot be requantized" in lines[0] and "--dtype bf16" in lines[0]
    assert "bitsandbytes" in lines[0] and ("NF4" in lines[0] or "FP4" in lines[0]) and not out.exists()


def test_validate_and_inspect_understand_the_format(bnb_base: tuple[Path, transformers.PreTrainedModel], tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "lora")
    result = CliRunner().invoke(main, ["validate", str(adapter), "--base", str(bnb_base[0])])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, ["inspect", str(bnb_base[0])])
    assert shown.exit_code == 0, shown.output
    assert "14 tensors bitsandbytes" in shown.output and "[bnb-4bit]" in shown.output and "merge with --dtype bf16 only" in shown.output


def _state(shape: list[int]) -> dict[str, object]:
    return {"blocksize": 64, "dtype": "float32", "shape": shape}


@pytest.mark.parametrize(
    ("state", "message"),
    [(_state([16, 32]), "is U8 [128, 1], but a [16, 32] weight"), (torch.zeros(5000, dtype=torch.uint8), "(5000 bytes; expected U8")],
    ids=["shape-disagrees", "oversized"],
)
def test_malformed_quant_state_is_refused_by_name(
    bnb_base: tuple[Path, transformers.PreTrainedModel], tmp_path: Path, state: dict[str, object] | torch.Tensor, message: str
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    stored = load_file(bnb_base[0] / "model.safetensors")
    (name,) = [k for k in stored if k.startswith(f"{Q0}.quant_state.")]
    raw = {**state, "quant_type": name.rsplit("__", 1)[1]} if isinstance(state, dict) else None
    stored[name] = torch.frombuffer(bytearray(json.dumps(raw).encode()), dtype=torch.uint8) if raw else state
    save_file(stored, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text((bnb_base[0] / "config.json").read_text())
    adapter = peft_adapter(tmp_path / "lora")
    for args in (
        ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "bf16", "--quiet"],
        ["validate", str(adapter), "--base", str(base)],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and Q0 in result.output and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_extract_from_a_bnb_base(bnb_base: tuple[Path, transformers.PreTrainedModel], tmp_path: Path) -> None:
    """extract reads the quantized base dequantized: tuned (fp32 merge) minus base is exactly the rank-4 ΔW."""
    base, dequantized = bnb_base
    adapter = peft_adapter(tmp_path / "lora", target_modules=["q_proj", "down_proj"])
    _merge(base, adapter, tmp_path / "tuned", "fp32")
    result = CliRunner().invoke(main, ["extract", str(base), str(tmp_path / "tuned"), "-o", str(tmp_path / "ex"), "--rank", "4"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and len(config["target_modules"]) == 4
    lora = load_file(tmp_path / "ex" / "adapter_model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    float_base = dequantized.state_dict()
    for module in config["target_modules"]:
        prefix = f"base_model.model.{module}"
        delta = lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
        want = tuned[f"{module}.weight"] - float_base[f"{module}.weight"]
        assert torch.allclose(delta, want, atol=1e-5), module
