"""A zoo of real PEFT adapters on tiny models of many architectures, checked against PEFT itself.

For each: PEFT 0.21 trains nothing but saves an adapter with random factors (init_lora_weights
False) on a model built from a tiny config; the truth is ``PeftModel.from_pretrained(base,
adapter)`` (unmerged).  ``validate --base`` must pass, ``loratools.merge`` must give those logits
(fp32, max abs 1e-4) once loaded with transformers, and a full-rank ``resize`` plus an ``add`` with
a zero-weighted copy must load back into PEFT with the same logits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import loratools

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = {"vocab_size": 64, "max_position_embeddings": 32}
DECODER = {**SMALL, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

# name -> (config class, model class, config fields, LoraConfig fields)
ZOO: dict[str, tuple[str, str, dict, dict]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**DECODER, "num_key_value_heads": 1}, {"target_modules": "all-linear"}),
    "qwen2-tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**DECODER, "num_key_value_heads": 1, "tie_word_embeddings": True},
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**DECODER, "num_key_value_heads": 1}, {"target_modules": "all-linear"}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**DECODER, "num_key_value_heads": 1, "head_dim": 8},
        {"target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"]},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**DECODER, "num_key_value_heads": 1, "head_dim": 8},
        {"target_modules": "all-linear", "use_rslora": True},
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {**DECODER, "num_key_value_heads": 2, "pad_token_id": 0},
        {"target_modules": ["qkv_proj", "gate_up_proj", "o_proj"], "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"o_proj": 3}},
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {**SMALL, "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "word_embed_proj_dim": 16},
        {"target_modules": ["q_proj", "v_proj", "fc1"]},
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 2, "n_head": 2},
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    ),
    "bert-seq-cls": (
        "BertConfig",
        "BertForSequenceClassification",
        {**SMALL, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "num_labels": 3},
        {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
    ),
    "roberta-seq-cls": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        {"vocab_size": 64, "max_position_embeddings": 34, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
        | {"intermediate_size": 32, "num_labels": 2, "pad_token_id": 1},
        {"target_modules": ["query", "key", "dense"], "task_type": "SEQ_CLS"},
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2, "decoder_start_token_id": 0},
        {"target_modules": ["q", "v", "wo"]},
    ),
}


def _build(name: str):
    config_cls, model_cls, fields, _ = ZOO[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))
    return model.eval()


def _logits(model, name: str) -> torch.Tensor:
    ids = torch.tensor([[3, 9, 4, 17, 8, 2]])
    with torch.no_grad():
        if name == "t5":
            return model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 7]])).logits
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=list(ZOO), ids=list(ZOO))
def case(request, tmp_path_factory) -> tuple[str, Path, Path, torch.Tensor]:
    """(name, base dir, adapter dir, PEFT's unmerged logits)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    _build(name).save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, ZOO[name][1]).from_pretrained(root / "base").eval()
        torch.manual_seed(1)
        lora = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **ZOO[name][3]}
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        if lora.get("task_type") == "SEQ_CLS":  # a trained head, as fine-tuning leaves it
            for p in peft_model.base_model.model.classifier.modules_to_save.default.parameters():
                torch.nn.init.normal_(p, std=0.5)
        peft_model.save_pretrained(root / "adapter")
    return name, root / "base", root / "adapter", _peft_logits(name, root / "base", root / "adapter")


def _peft_logits(name: str, base: Path, adapter: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, ZOO[name][1]).from_pretrained(base).eval()
        return _logits(peft.PeftModel.from_pretrained(model, adapter).eval(), name)


def test_validate_base_passes(case):
    name, base, adapter, _ = case
    report = loratools.validate(adapter, base=base)
    assert report.ok, report.errors


def test_merge_gives_peft_inference_logits(case, tmp_path):
    name, base, adapter, truth = case
    loratools.merge(base, [adapter], out=tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = getattr(transformers, ZOO[name][1]).from_pretrained(tmp_path / "merged").eval()
    assert (_logits(merged, name) - truth).abs().max().item() < 1e-4


def test_resize_and_add_outputs_load_in_peft_with_the_same_logits(case, tmp_path):
    name, base, adapter, truth = case
    loaded = loratools.load(adapter)
    full_rank = max(m.rank for m in loaded.modules.values())
    resized, _ = loratools.resize(loaded, full_rank)
    loratools.save(resized, tmp_path / "resized")
    assert (_peft_logits(name, base, tmp_path / "resized") - truth).abs().max().item() < 1e-4
    if loaded.extra_tensors:  # full tensors admit weight 1 only: add a copy of the LoRA part at weight 0
        lora_only = loratools.Adapter(loaded.modules, {k: v for k, v in loaded.config.items() if k != "modules_to_save"})
        summed = loratools.add(loaded, loratools.scale(lora_only, 0.0))
    else:
        summed = loratools.add(loaded, loratools.scale(loaded, 0.0))
    loratools.save(summed, tmp_path / "summed")
    assert (_peft_logits(name, base, tmp_path / "summed") - truth).abs().max().item() < 1e-4
