"""Linear algebra on factored low-rank matrices ΔW = s·B·A, never forming ΔW.

Shapes: B is (m, r), A is (r, n); conv factors are flattened first (see :func:`flat`).
Everything here costs O((m+n)·r²) time and O((m+n)·r) memory instead of O(m·n).
"""

from __future__ import annotations

import torch


def flat(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View conv factors B (out, r, 1, ...) and A (r, in, kh, ...) as matrices (out, r) and (r, in·kh·...)."""
    return B.reshape(B.shape[0], B.shape[1]), A.reshape(A.shape[0], -1)


def inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product ⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)), in float64."""
    B1, A1 = (t.double() for t in flat(B1, A1))
    B2, A2 = (t.double() for t in flat(B2, A2))
    return float(torch.sum((B1.T @ B2) * (A1 @ A2.T)))


def frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F = sqrt(tr((BᵀB)(AAᵀ))), in float64 (clamped at 0 against round-off)."""
    return max(inner(B, A, B, A), 0.0) ** 0.5
