"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): ΔW = Σ wᵢ·ΔWᵢ.

The exact weighted sum every other command computes in factored form.
"""

from __future__ import annotations

from .base import Method, keep_all, weighted_sum

METHOD = Method("task_arithmetic", keep_all, weighted_sum, uses_density=False, uses_sign=False, random=False, paper="arXiv:2212.04089")
