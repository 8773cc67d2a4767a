"""DELLA without sign election (mergekit's ``della_linear``): ΔW = Σ wᵢ·MAGPRUNE(ΔWᵢ), arXiv:2406.11617.

MAGPRUNE as in :mod:`.della`: per-row magnitude-ranked keep probabilities in [p − ε, p + ε],
kept entries rescaled by 1/pⱼ.
"""

from __future__ import annotations

from .base import Method, weighted_sum
from .della import select_della

METHOD = Method(
    "della_linear",
    select_della,
    weighted_sum,
    uses_density=True,
    uses_sign=False,
    random=True,
    paper="arXiv:2406.11617",
    uses_epsilon=True,
    rowwise=True,
)
