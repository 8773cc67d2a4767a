"""Full tensors and embeddings merged as PEFT runs them: modules_to_save, trainable tokens, tied heads, grown vocabularies.

The reference is the unmerged ``PeftModel.from_pretrained(base, adapter)``'s logits on tiny Llamas
built from configs; a merged checkpoint must load in transformers and give them (fp32, 1e-4).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import loratools
from loratools.errors import InvalidAdapterError, MergeError
from tests.conftest import tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 63, 2, 7, 3]])


def _base(path: Path, *, tied: bool, vocab: int | None = None) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, seed: int = 1, grow: int | None = None, **lora: object) -> Path:
    """A PEFT adapter with random LoRA factors and full tensors moved away from the base's values."""
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if grow is not None:
        model.resize_token_embeddings(grow)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, **lora))  # type: ignore[arg-type]
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and "lora_" not in name:
                    p.add_(torch.randn_like(p) * 0.5)
        pm.save_pretrained(path)
    return path


def _peft_logits(base: Path, adapters: list[Path], grow: int | None = None) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if grow is not None:
        model.resize_token_embeddings(grow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for i, a in enumerate(adapters[1:], 1):
            pm.load_adapter(a, adapter_name=f"a{i}")
        if len(adapters) > 1:
            pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
        with torch.no_grad():
            return pm.eval()(IDS).logits


def _merged_logits(out: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(out).eval()(IDS).logits


CASES = {
    "tied, modules_to_save embed_tokens": (True, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}),
    "tied, LoRA on embed_tokens": (True, {"target_modules": ["q_proj", "embed_tokens"]}),
    "tied, LoRA on lm_head": (True, {"target_modules": ["q_proj", "lm_head"]}),
    "tied, modules_to_save lm_head": (True, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "tied, ensure_weight_tying modules_to_save": (
        True,
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
    ),
    "tied, ensure_weight_tying LoRA lm_head": (True, {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True}),
    "tied, trainable tokens": (True, {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 9]}),
    "untied, trainable tokens": (False, {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 9]}),
    "untied, modules_to_save both": (False, {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_inference(tmp_path: Path, case: str) -> None:
    tied, lora = CASES[case]
    base = _base(tmp_path / "base", tied=tied)
    adapter = _adapter(base, tmp_path / "adapter", **lora)
    assert loratools.validate(adapter, base=base).ok, loratools.validate(adapter, base=base).problems
    out = tmp_path / "out"
    loratools.merge(base, [adapter], out=out)
    diff = float((_merged_logits(out) - _peft_logits(base, [adapter])).abs().max())
    assert diff < 1e-4, diff


def test_untying_writes_the_head_and_the_config(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=True)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    out = tmp_path / "out"
    loratools.merge(base, [adapter], out=out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], original["model.embed_tokens.weight"])  # the head keeps the base embedding


def test_sharded_untied_head_is_indexed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="4KB")
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "out"
    loratools.merge(base, [adapter], out=out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    sizes = sum((out / f).stat().st_size for f in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] < sizes
    diff = float((_merged_logits(out) - _peft_logits(base, [adapter])).abs().max())
    assert diff < 1e-4, diff


@pytest.mark.parametrize("saved", [["embed_tokens", "lm_head"], ["embed_tokens"]])
def test_grown_vocabulary(tmp_path: Path, saved: list[str]) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", grow=70, target_modules=["q_proj"], modules_to_save=saved)
    assert loratools.validate(adapter, base=base).ok
    out = tmp_path / "out"
    loratools.merge(base, [adapter], out=out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 70
    ids = torch.tensor([[1, 69, 65, 3]])
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(70)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        want = pm(ids).logits
        got = transformers.LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
    assert float((got - want).abs().max()) < 1e-4


def test_grown_embedding_without_its_head_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", grow=70, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.lm_head.weight"]  # the grown head's new rows are then nowhere
    save_file(tensors, weights, {"format": "pt"})
    codes = [p.code for p in loratools.validate(adapter, base=base).problems]
    assert codes == ["vocab-mismatch"]
    with pytest.raises(InvalidAdapterError, match="grows the vocabulary"):
        loratools.merge(base, [adapter], out=tmp_path / "out")


def test_two_adapters_with_different_full_copies_are_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    lora = {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    a, b = _adapter(base, tmp_path / "a", seed=1, **lora), _adapter(base, tmp_path / "b", seed=2, **lora)
    with pytest.raises(MergeError, match="different full copies of lm_head.weight"):
        loratools.merge(base, [a, b], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_on_full_tensors_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    a = _adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(MergeError, match="weight 0.5 has no exact meaning"):
        loratools.merge(base, [a], weights=[0.5], out=tmp_path / "out")
    t = _adapter(base, tmp_path / "t", target_modules=["q_proj"], trainable_token_indices=[4])
    with pytest.raises(MergeError, match="weight 2 has no exact meaning"):
        loratools.merge(base, [t], weights=[2.0], out=tmp_path / "out")


def test_disjoint_trainable_tokens_of_two_adapters_merge(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    a = _adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    b = _adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj"], trainable_token_indices=[9])
    out = tmp_path / "out"
    loratools.merge(base, [a, b], out=out)
    once = tmp_path / "a-merged"
    loratools.merge(base, [a], out=once)  # PEFT runs one trainable-tokens adapter at a time: merge a, then run b on it
    diff = float((_merged_logits(out) - _peft_logits(once, [b])).abs().max())
    assert diff < 1e-4, diff
    c = _adapter(base, tmp_path / "c", seed=3, target_modules=["v_proj"], trainable_token_indices=[5])
    with pytest.raises(MergeError, match="PEFT refuses overlapping tokens"):
        loratools.merge(base, [a, c], out=tmp_path / "out2")


PEFT_MERGES = {  # cases where PEFT's own merge_and_unload + save_pretrained gives its unmerged logits
    "tied, modules_to_save lm_head": CASES["tied, modules_to_save lm_head"],
    "tied, modules_to_save embed_tokens": CASES["tied, modules_to_save embed_tokens"],
    "tied, ensure_weight_tying modules_to_save": CASES["tied, ensure_weight_tying modules_to_save"],
    "tied, trainable tokens": CASES["tied, trainable tokens"],
    "untied, modules_to_save both": CASES["untied, modules_to_save both"],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(PEFT_MERGES))
def test_low_precision_is_bit_identical_to_peft_merge(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    tied, lora = PEFT_MERGES[case]
    fp32 = _base(tmp_path / "fp32", tied=tied)
    base = tmp_path / "base"
    transformers.LlamaForCausalLM.from_pretrained(fp32, dtype=dtype).save_pretrained(base)
    adapter = _adapter(fp32, tmp_path / "adapter", **lora)
    out = tmp_path / "out"
    loratools.merge(base, [adapter], out=out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype), adapter)
        pm.merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "peft" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (
        json.loads((out / "config.json").read_text())["tie_word_embeddings"]
        == json.loads((tmp_path / "peft" / "config.json").read_text())["tie_word_embeddings"]
    )


def test_unmerge_of_a_lora_on_a_tied_embedding_restores_the_base(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=True)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens", "lm_head"])
    merged, back = tmp_path / "merged", tmp_path / "back"
    loratools.merge(base, [adapter], out=merged)
    loratools.unmerge(merged, adapter, out=back)
    with torch.no_grad():
        want = transformers.LlamaForCausalLM.from_pretrained(base).eval()(IDS).logits
    assert float((_merged_logits(back) - want).abs().max()) < 1e-4


def test_unmerge_refuses_trainable_tokens(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=False)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=[3])
    loratools.merge(base, [adapter], out=tmp_path / "merged")
    with pytest.raises(MergeError, match="cannot unmerge"):
        loratools.unmerge(tmp_path / "merged", adapter, out=tmp_path / "back")


def test_tokens_on_a_replaced_tensor_are_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=True)
    mts = _adapter(base, tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    tokens = _adapter(base, tmp_path / "tokens", target_modules=["q_proj"], trainable_token_indices=[3])
    with pytest.raises(MergeError, match="PEFT cannot run both"):
        loratools.merge(base, [mts, tokens], out=tmp_path / "out")


def test_merge_result_names_the_added_head_and_config(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", tied=True)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    result = loratools.merge(base, [adapter], out=tmp_path / "out")
    assert result.added == ["lm_head.weight"] and result.config == {"tie_word_embeddings": False}
    assert result.tensors == 21  # the base's 20 and the untied head


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["lm_head"], "fan_in_fan_out": False},
        {"target_modules": ["c_attn"], "modules_to_save": ["wte"], "fan_in_fan_out": True},
    ],
)
def test_gpt2_tied_head(tmp_path: Path, lora: dict) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = tmp_path / "base"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(base)
    model = transformers.GPT2LMHeadModel.from_pretrained(base)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, **lora))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and "lora_" not in name:
                    p.add_(torch.randn_like(p) * 0.5)
        pm.save_pretrained(tmp_path / "adapter")
        ref = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), tmp_path / "adapter").eval()
    assert loratools.validate(tmp_path / "adapter", base=base).ok
    loratools.merge(base, [tmp_path / "adapter"], out=tmp_path / "out")
    with torch.no_grad():
        got = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()(IDS).logits
        assert float((got - ref(IDS).logits).abs().max()) < 1e-4
