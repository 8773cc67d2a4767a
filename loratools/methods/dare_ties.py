"""DARE-TIES (arXiv:2311.03099 with arXiv:2306.01708): DARE's random drop and rescale, then TIES's sign election and disjoint mean.

τᵢ = drop(ΔWᵢ, p) (keep with probability p, rescale by 1/p); γ elected on Σ τᵢ (or by frequency);
ΔW = Σ_{i agreeing} wᵢ·τᵢ / |{i agreeing}|.
"""

from __future__ import annotations

from .base import Method, select_drop, ties_mean

METHOD = Method("dare_ties", select_drop, ties_mean, uses_density=True, uses_sign=True, random=True, paper="arXiv:2311.03099")
