"""Merging PEFT variants whose meaning is not a plain ΔW, against what PEFT computes at inference.

The reference is always the logits of ``PeftModel.from_pretrained(base, adapter)`` (unmerged) on a
tiny model built from a transformers config.  Each variant is merged exactly or refused in one line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from loratools import InvalidAdapterError, MergeError, load, merge, save, scale, unmerge, validate

from ..conftest import tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 5, 9, 11, 3]])  # holds aLoRA's invocation tokens [5, 9] (twice)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = tiny_llama_config(**sizes, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _train(peft_model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every LoRA factor off its initial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)


def _peft_logits(model_cls: type, base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=dtype), adapter).eval()
        with torch.no_grad():
            return model(IDS).logits


def _logits(model_cls: type, path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model_cls.from_pretrained(path, dtype=dtype).eval()(IDS).logits


def _edit_config(adapter: Path, **fields: object) -> Path:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return adapter


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_default_and_converted_saves_merge_exactly(tmp_path: Path, init: str) -> None:
    base = tmp_path / "base"
    _llama().save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
        pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain LoRA
        pm.save_pretrained(tmp_path / "initial")
        pm.peft_config["default"].init_lora_weights = init
        _train(pm)
        pm.save_pretrained(tmp_path / "default")
        pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    reference = _peft_logits(LlamaForCausalLM, base, tmp_path / "default")  # PEFT rebuilds the residual base on load

    report = validate(tmp_path / "default")  # arithmetic and other formats still cannot carry it: a warning
    assert report.ok and [p.code for p in report.warnings] == ["residual-init"]
    assert validate(tmp_path / "default", base=base).problems == []
    exact = merge(base, [tmp_path / "default"], out=tmp_path / "exact")  # the residual base rebuilt as PEFT does on load
    assert (_logits(LlamaForCausalLM, exact.out) - reference).abs().max() < 1e-4
    with pytest.raises(MergeError, match="cannot unmerge"):
        unmerge(exact.out, tmp_path / "default", out=tmp_path / "back")

    converted = load(tmp_path / "converted")
    assert converted.config["init_lora_weights"] is True and converted.config["r"] == 8
    result = merge(base, [tmp_path / "converted"], out=tmp_path / "merged")
    assert (_logits(LlamaForCausalLM, result.out) - reference).abs().max() < 1e-4
    # the converted adapter's outputs of arithmetic still load in PEFT and mean the same model
    save(scale(converted, 1.0), tmp_path / "scaled")
    assert (_peft_logits(LlamaForCausalLM, base, tmp_path / "scaled") - reference).abs().max() < 1e-4


def test_alora_is_refused_and_arithmetic_carries_its_tokens(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _llama().save_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, alora_invocation_tokens=[5, 9], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_llama(), config)
        _train(pm)
        pm.save_pretrained(tmp_path / "alora")
    reference = _peft_logits(LlamaForCausalLM, base, tmp_path / "alora")
    assert [(p.code, p.severity) for p in validate(tmp_path / "alora", base=base).problems] == [("alora-unmergeable", "error")]
    with pytest.raises(InvalidAdapterError, match="PEFT refuses to merge it too"):
        merge(base, [tmp_path / "alora"], out=tmp_path / "refused")
    save(scale(load(tmp_path / "alora"), 1.0), tmp_path / "scaled")
    assert json.loads((tmp_path / "scaled" / "adapter_config.json").read_text())["alora_invocation_tokens"] == [5, 9]
    assert (_peft_logits(LlamaForCausalLM, base, tmp_path / "scaled") - reference).abs().max() < 1e-5


def test_layer_replication_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _llama().save_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, layer_replication=[[0, 2], [1, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(_llama(), config).save_pretrained(tmp_path / "replicated")
    assert [p.code for p in validate(tmp_path / "replicated", base=base).problems] == ["layer-replication"]
    with pytest.raises(InvalidAdapterError, match="does not write the expanded checkpoint"):
        merge(base, [tmp_path / "replicated"], out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def _fan_in_fan_out_case(tmp_path: Path, model_fn, targets: list[str], *, trained: bool, written: bool, dtype=torch.float32):  # type: ignore[no-untyped-def]
    """A base and an adapter trained with fan_in_fan_out=``trained`` whose config was then edited to say ``written``."""
    base = tmp_path / "base"
    model_fn().to(dtype).save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=trained)
        pm = get_peft_model(model_fn(), config)
        pm.save_pretrained(tmp_path / "adapter")
    return base, _edit_config(tmp_path / "adapter", fan_in_fan_out=written)


def test_gpt2_conv1d_with_fan_in_fan_out_false_follows_peft(tmp_path: Path) -> None:
    base, adapter = _fan_in_fan_out_case(tmp_path, _gpt2, ["c_attn", "c_proj", "c_fc"], trained=True, written=False)
    reference = _peft_logits(GPT2LMHeadModel, base, adapter)  # PEFT forces the flag to true on Conv1D, with a warning
    report = validate(adapter, base=base)
    assert report.ok and [p.code for p in report.warnings] == ["fan-in-fan-out-overridden"]
    result = merge(base, [adapter], out=tmp_path / "merged")
    assert (_logits(GPT2LMHeadModel, result.out) - reference).abs().max() < 1e-4
    assert len(result.warnings) == 1 and "PEFT overrides the flag" in result.to_dict()["warnings"][0]
    # a bare weights file names no model type: the square attn.c_proj is refused, not guessed
    with pytest.raises(InvalidAdapterError, match="square layer"):
        merge(base / "model.safetensors", [adapter], out=tmp_path / "bare.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_linear_with_fan_in_fan_out_true_follows_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    base, adapter = _fan_in_fan_out_case(tmp_path, _llama, ["q_proj", "o_proj", "v_proj"], trained=False, written=True, dtype=dtype)
    assert [p.code for p in validate(adapter, base=base).warnings] == ["fan-in-fan-out-overridden"]
    result = merge(base, [adapter], out=tmp_path / "merged")
    got = _logits(LlamaForCausalLM, result.out, dtype)
    if dtype == torch.float32:
        assert (got - _peft_logits(LlamaForCausalLM, base, adapter)).abs().max() < 1e-4
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=dtype), adapter).merge_and_unload()
        peft_merged.save_pretrained(tmp_path / "peft-merged")
    assert torch.equal(got, _logits(LlamaForCausalLM, tmp_path / "peft-merged", dtype))


def test_unconverted_lora_ga_merges_as_peft_loads_it(tmp_path: Path) -> None:
    # PEFT's lora_ga_init finds no gradients when loading, keeps the original base, and the saved factors replace its init
    base = tmp_path / "base"
    _llama().save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(_llama(), config).save_pretrained(tmp_path / "adapter")
    adapter = _edit_config(tmp_path / "adapter", init_lora_weights="lora_ga")
    reference = _peft_logits(LlamaForCausalLM, base, adapter)
    result = merge(base, [adapter], out=tmp_path / "merged")
    assert (_logits(LlamaForCausalLM, result.out) - reference).abs().max() < 1e-4
    assert [w.split(":")[0] for w in result.warnings] == ["init_lora_weights"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_bf16_merge_is_bit_identical_to_peft(tmp_path: Path, init: str) -> None:
    base = tmp_path / "base"
    _llama().to(torch.bfloat16).save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
        _train(pm)
        pm.save_pretrained(tmp_path / "adapter")
        theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), tmp_path / "adapter")
        theirs.merge_and_unload().save_pretrained(tmp_path / "peft")
    merge(base, [tmp_path / "adapter"], out=tmp_path / "ours")
    ours, peft_merged = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "peft" / "model.safetensors")
    changed = [k for k in ours if not torch.equal(ours[k], load_file(base / "model.safetensors")[k])]
    assert changed and all(torch.equal(ours[k], peft_merged[k]) for k in ours if k in peft_merged)


def test_randomized_pissa_is_still_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _llama().save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa_niter_2"))
        pm.save_pretrained(tmp_path / "adapter")
    assert [(p.code, p.severity) for p in validate(tmp_path / "adapter", base=base).problems] == [("residual-init", "error")]
    with pytest.raises(InvalidAdapterError, match="path_initial_model_for_weight_conversion"):
        merge(base, [tmp_path / "adapter"], out=tmp_path / "refused")
