"""Small random adapters for unit and property tests."""

from __future__ import annotations

import torch

from loratools.adapter import Adapter, LoraModule


def random_module(out: int = 6, inp: int = 5, rank: int = 3, *, alpha: float = 6.0, dtype=torch.float32, seed: int = 0, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, generator=g).to(dtype)
    B = torch.randn(out, rank, generator=g).to(dtype)
    return LoraModule(A, B, alpha, **kw)


def random_adapter(
    n: int = 2, *, out: int = 6, inp: int = 5, rank: int = 3, alpha: float = 6.0, dtype=torch.float32, seed: int = 0
) -> Adapter:
    modules = {
        f"model.layers.{i}.self_attn.q_proj": random_module(out, inp, rank, alpha=alpha, dtype=dtype, seed=seed + i) for i in range(n)
    }
    return Adapter(modules, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]})
