"""Shared fixtures: tiny real models built from configs (never downloaded) and their adapters."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama_config(**overrides):
    """A 2-layer Llama config small enough to build in milliseconds; ``overrides`` replace any field."""
    import transformers

    fields = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    return transformers.LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


def peft_adapter(tmp: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Save a PEFT adapter with non-zero (random) B on a tiny Llama; returns its directory."""
    import peft

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    model = tiny_llama(seed=0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
        pm.save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint directory (model.safetensors + config.json)."""
    path = tmp_path_factory.mktemp("llama-base")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory) -> Path:
    """A PEFT-written adapter for the tiny Llama: r=4, alpha=8, q_proj and v_proj."""
    return peft_adapter(tmp_path_factory.mktemp("peft-adapter"))
