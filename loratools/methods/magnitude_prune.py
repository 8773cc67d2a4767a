"""Magnitude pruning then task arithmetic (as in TIES's trim step, arXiv:2306.01708): ΔW = Σ wᵢ·trim(ΔWᵢ, density).

trim keeps each input's k = ⌊density·numel⌋ largest-magnitude entries over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, MethodOptions, trim, weighted_sum


def _combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions, gen: torch.Generator | None) -> torch.Tensor:
    return weighted_sum([trim(d, options.density) for d in deltas], weights)


METHOD = Method("magnitude_prune", _combine, uses_density=True, uses_sign=False, random=False, paper="arXiv:2306.01708")
