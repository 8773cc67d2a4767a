"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708).

τᵢ = trim(ΔWᵢ, density) keeps each input's top-k entries by magnitude; the elected sign is
γ = sign(Σ τᵢ) (``total``) or the sign most inputs hold (``frequency``); the result is the disjoint
mean ΔW = Σ_{i: sign τᵢ = γ} wᵢ·τᵢ / |{i: sign τᵢ = γ}|, entry by entry.
"""

from __future__ import annotations

from .base import Method, ties_mean
from .magnitude import select_trim

METHOD = Method("ties", select_trim, ties_mean, uses_density=True, uses_sign=True, random=False, paper="arXiv:2306.01708")
