"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099), linear combination.

Each entry of each ΔWᵢ is dropped with probability 1 − p (p = density) and kept ones are rescaled
by 1/p, so E[drop(ΔWᵢ)] = ΔWᵢ; then ΔW = Σ wᵢ·drop(ΔWᵢ).  Drops are drawn from a generator seeded
by (seed, module), so a run is reproducible.
"""

from __future__ import annotations

from .base import Method, select_drop, weighted_sum

METHOD = Method("dare", select_drop, weighted_sum, uses_density=True, uses_sign=False, random=True, paper="arXiv:2311.03099")
