"""MoE adapters under transformers 5: PEFT's ``target_parameters`` on fused experts and routers.

The reference is the adapter at inference, ``PeftModel.from_pretrained(base, adapter)`` unmerged, on
tiny Mixtral and Qwen3-MoE models; bf16 merges must equal PEFT's own merge_and_unload bit for bit.
Checkpoints come in both layouts: per-expert keys (what save_pretrained writes) and fused 3-D keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import loratools
from loratools import merge, unmerge

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 12, 40]])
SMALL = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


def mixtral_config() -> transformers.PretrainedConfig:
    return transformers.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)


def qwen3_moe_config() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        **SMALL, intermediate_size=24, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32, head_dim=8
    )


CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {"mixtral": mixtral_config, "qwen3_moe": qwen3_moe_config}
# What users pass: expert module names (PEFT turns them into target_parameters, doubling the fused
# gate_up rank), target_parameters directly, and a router LoRA beside attention modules.
TARGETS: dict[str, dict[str, object]] = {
    "expert-modules": {"target_modules": {"mixtral": ["w1", "w2", "w3"], "qwen3_moe": ["gate_proj", "up_proj", "down_proj"]}},
    "target-parameters": {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
    "down-only": {"target_modules": [], "target_parameters": ["down_proj"]},
    "router-and-attention": {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.gate.weight"]},
}


def model(arch: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).to(dtype).eval()


def save_base(arch: str, path: Path, *, fused: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """save_pretrained's per-expert checkpoint, or the model's own fused state dict as one file."""
    m = model(arch, dtype)
    m.save_pretrained(path)
    if fused:
        (path / "model.safetensors").unlink()
        save_file(
            {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight" or not m.config.tie_word_embeddings},
            path / "model.safetensors",
            {"format": "pt"},
        )
    return path


def make_adapter(arch: str, case: str, path: Path, r: int = 2) -> Path:
    kwargs = dict(TARGETS[case])
    if isinstance(kwargs["target_modules"], dict):
        kwargs["target_modules"] = kwargs["target_modules"][arch]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model(arch), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs))  # type: ignore[arg-type]
        peft_model.save_pretrained(path)
    return path


def peft_logits(arch: str, adapter: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model(arch, dtype), adapter).eval()(IDS).logits


def merged_logits(out: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()(IDS).logits


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
@pytest.mark.parametrize("case", list(TARGETS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_merge_matches_peft_inference(tmp_path: Path, arch: str, case: str, fused: bool) -> None:
    base = save_base(arch, tmp_path / "base", fused=fused)
    adapter = make_adapter(arch, case, tmp_path / "adapter")
    report = loratools.validate(adapter, base=base)
    assert report.ok and not report.warnings, report.problems
    expected = peft_logits(arch, adapter)
    result = merge(base, [adapter], out=tmp_path / "merged")
    assert (merged_logits(result.out) - expected).abs().max() <= 1e-4
    assert not torch.allclose(merged_logits(base), expected, atol=1e-3)  # the adapter changes the logits
    back = unmerge(result.out, adapter, out=tmp_path / "back")
    assert (merged_logits(back.out) - merged_logits(base)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_bf16_merge_is_bit_identical_to_peft_merge(tmp_path: Path, arch: str) -> None:
    base = save_base(arch, tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(arch, "expert-modules", tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(model(arch, torch.bfloat16), adapter).merge_and_unload().save_pretrained(tmp_path / "peft")
    result = merge(base, [adapter], out=tmp_path / "ours")
    ours = transformers.AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.bfloat16).state_dict()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft", dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert torch.equal(merged_logits(result.out, torch.bfloat16), merged_logits(tmp_path / "peft", torch.bfloat16))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_resize_add_scale_outputs_load_in_peft_and_act_as_computed(tmp_path: Path, arch: str) -> None:
    """Factored arithmetic on fused-expert modules: outputs load in PEFT and give the predicted logits."""
    a = loratools.load(make_adapter(arch, "expert-modules", tmp_path / "a", r=2))
    b = loratools.load(make_adapter(arch, "target-parameters", tmp_path / "b", r=3))
    full = loratools.resize(a, rank=4)[0]  # gate_up has rank 4, down 2: rank 4 keeps every ΔW exactly
    loratools.save(full, tmp_path / "full")
    assert (peft_logits(arch, tmp_path / "full") - peft_logits(arch, tmp_path / "a")).abs().max() <= 1e-4
    half = loratools.scale(a, 0.5)
    loratools.save(half, tmp_path / "half")
    loratools.save(loratools.add(half, half), tmp_path / "twice-half")
    assert (peft_logits(arch, tmp_path / "twice-half") - peft_logits(arch, tmp_path / "a")).abs().max() <= 1e-4
    both = loratools.add(a, b)
    loratools.save(both, tmp_path / "both")
    base = save_base(arch, tmp_path / "base")
    merged = merge(base, [tmp_path / "a", tmp_path / "b"], out=tmp_path / "ab")
    assert (peft_logits(arch, tmp_path / "both") - merged_logits(merged.out)).abs().max() <= 1e-4
    small, rows = loratools.resize(a, rank=1)
    assert {row.new_rank for row in rows} == {1}
    loratools.save(small, tmp_path / "small")
    assert peft_logits(arch, tmp_path / "small").shape == IDS.shape + (64,)
