"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): ΔW = Σ wᵢ·ΔWᵢ.

The exact weighted sum every other command computes in factored form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, MethodOptions, weighted_sum


def _combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions, gen: torch.Generator | None) -> torch.Tensor:
    return weighted_sum(deltas, weights)


METHOD = Method("task_arithmetic", _combine, uses_density=False, uses_sign=False, random=False, paper="arXiv:2212.04089")
