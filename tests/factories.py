"""Builders every test shares: small random adapters and the dense reference they must match."""

from __future__ import annotations

import torch

from loratools.adapter import Adapter, LoraModule


def random_module(
    out: int = 6,
    inp: int = 5,
    rank: int = 3,
    *,
    alpha: float = 8.0,
    rslora: bool = False,
    kind: str = "linear",
    kernel: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoraModule:
    """A module with random (non-zero) A and B; conv when ``kernel`` is given (A: r x in x kernel)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, *kernel, generator=g).to(dtype)
    B = torch.randn(out, rank, *((1,) * len(kernel)), generator=g).to(dtype)
    return LoraModule(A, B, alpha, rslora, "conv" if kernel else kind)  # type: ignore[arg-type]


def make_adapter(modules: dict[str, LoraModule], **config) -> Adapter:
    """An in-memory adapter holding ``modules``; its config is refit from the modules on save."""
    first = next(iter(modules.values()))
    base = {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "target_modules": sorted(modules)}
    return Adapter(modules, {**base, **config})


def random_adapter(
    n: int = 2, *, out: int = 6, inp: int = 5, rank: int = 3, alpha: float = 6.0, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Adapter:
    """``n`` random q_proj modules (layers 0..n-1) with one rank and alpha."""
    modules = {
        f"model.layers.{i}.self_attn.q_proj": random_module(out, inp, rank, alpha=alpha, dtype=dtype, seed=seed + i) for i in range(n)
    }
    return Adapter(modules, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]})


def dense(m: LoraModule) -> torch.Tensor:
    """s·B·A in float64 as a matrix (out, in·k...), the reference every factored result must match."""
    B = m.B.reshape(m.B.shape[0], m.B.shape[1]).double()
    A = m.A.reshape(m.A.shape[0], -1).double()
    return m.scale * (B @ A)
