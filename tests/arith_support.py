"""Builders shared by the arithmetic tests: random factored adapters, tiny Llamas, dense references."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA = {"hidden": 16, "mlp": 32, "vocab": 64}


def module(
    out: int,
    inp: int,
    rank: int,
    *,
    alpha: float = 8.0,
    rslora: bool = False,
    seed: int = 0,
    kind: str = "linear",
    kernel: tuple[int, ...] = (),
) -> LoraModule:
    """A module with random (non-zero) A and B; conv when ``kernel`` is given."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, *kernel, generator=g)
    B = torch.randn(out, rank, *((1,) * len(kernel)), generator=g)
    return LoraModule(A, B, alpha, rslora, "conv" if kernel else kind)  # type: ignore[arg-type]


def adapter(modules: dict[str, LoraModule], **config) -> Adapter:
    """An in-memory adapter; its config is refit from the modules on save."""
    first = next(iter(modules.values()))
    base = {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "target_modules": sorted(modules)}
    return Adapter(modules, {**base, **config})


def dense(m: LoraModule) -> torch.Tensor:
    """s·B·A in float64 as a matrix (out, in·k...), the reference every factored result must match."""
    B = m.B.reshape(m.B.shape[0], m.B.shape[1]).double()
    A = m.A.reshape(m.A.shape[0], -1).double()
    return m.scale * (B @ A)


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=LLAMA["vocab"],
        hidden_size=LLAMA["hidden"],
        intermediate_size=LLAMA["mlp"],
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def peft_adapter(path: Path, *, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT adapter with random (non-zero) factors on the tiny Llama; returns its directory."""
    import peft

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        model.save_pretrained(path)
    return path
