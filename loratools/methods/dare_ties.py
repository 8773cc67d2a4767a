"""DARE-TIES (arXiv:2311.03099 with arXiv:2306.01708): DARE's random drop and rescale, then TIES's sign election and disjoint mean.

τᵢ = drop(ΔWᵢ, p) (keep with probability p, rescale by 1/p); γ elected on Σ τᵢ (or by frequency);
ΔW = Σ_{i agreeing} wᵢ·τᵢ / |{i agreeing}|.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, MethodOptions, disjoint_mean, drop, elect_sign


def _combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions, gen: torch.Generator | None) -> torch.Tensor:
    dropped = [drop(d, options.density, gen) for d in deltas]
    agree = elect_sign(torch.stack(dropped), options.majority_sign)
    return disjoint_mean(dropped, weights, agree)


METHOD = Method("dare_ties", _combine, uses_density=True, uses_sign=True, random=True, paper="arXiv:2311.03099")
