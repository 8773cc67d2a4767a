"""Magnitude pruning then task arithmetic (as in TIES's trim step, arXiv:2306.01708): ΔW = Σ wᵢ·trim(ΔWᵢ, density).

trim keeps each input's k = ⌊density·numel⌋ largest-magnitude entries over the whole tensor.
"""

from __future__ import annotations

from .base import Method, weighted_sum
from .magnitude import select_trim

METHOD = Method("magnitude_prune", select_trim, weighted_sum, uses_density=True, uses_sign=False, random=False, paper="arXiv:2306.01708")
