"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).

τᵢ = trim(ΔWᵢ, density) keeps each input's top-k entries by magnitude; the elected sign is
γ = sign(Σ τᵢ) (``total``) or the sign most inputs hold (``frequency``); the result is the disjoint
mean ΔW = Σ_{i: sign τᵢ = γ} wᵢ·τᵢ / |{i: sign τᵢ = γ}|, entry by entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Method, MethodOptions, disjoint_mean, elect_sign, trim


def _combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: MethodOptions, gen: torch.Generator | None) -> torch.Tensor:
    trimmed = [trim(d, options.density) for d in deltas]
    agree = elect_sign(torch.stack(trimmed), options.majority_sign)
    return disjoint_mean(trimmed, weights, agree)


METHOD = Method("ties", _combine, uses_density=True, uses_sign=True, random=False, paper="arXiv:2306.01708")
