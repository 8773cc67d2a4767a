"""Builders shared by the arithmetic tests: random factored adapters and dense references."""

from __future__ import annotations

import torch

from loratools.adapter import Adapter, LoraModule


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
