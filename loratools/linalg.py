"""Linear algebra on factored low-rank matrices ΔW = s·B·A, never forming ΔW.

Shapes: B is (m, r), A is (r, n); conv factors are flattened first (see :func:`flat`).
Everything here costs O((m+n)·r²) time and O((m+n)·r) memory instead of O(m·n).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class FactoredSVD:
    """The SVD of s·B·A kept in factored form: s·B·A = Q_B·U_c·diag(σ)·V_cᵀ·Q_Aᵀ.

    ``QB`` (m, p) and ``QA`` (n, q) have orthonormal columns (float32 or float64); the core SVD
    ``Uc`` (p, t), ``S`` (t), ``Vhc`` (t, q) is float64, t = min(p, q) <= r.  The outer products with
    Q_B and Q_A are deferred to :meth:`truncate`, so choosing a rank first costs nothing extra.
    """

    QB: torch.Tensor
    Uc: torch.Tensor
    S: torch.Tensor
    Vhc: torch.Tensor
    QA: torch.Tensor

    def truncate(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U (m, k), σ (k), Vᵀ (k, n) of the best rank-k approximation (Eckart–Young), in Q's dtype."""
        dtype = self.QB.dtype
        U = self.QB @ self.Uc[:, :k].to(dtype)
        Vh = self.Vhc[:k].to(dtype) @ self.QA.T
        return U, self.S[:k].to(dtype), Vh


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> FactoredSVD:
    """SVD of ΔW = s·B·A from a QR of B and of Aᵀ and an SVD of the small core s·R_B·R_Aᵀ.

    Costs O((m+n)·r²) instead of the O(m·n·min(m, n)) of a dense SVD.  The QRs run in float32
    (float64 if the factors are), the r x r core in float64.  Conv factors are flattened first.
    """
    B, A = flat(B, A)
    dtype = _compute_dtype(B)
    QB, RB = torch.linalg.qr(B.to(dtype))
    QA, RA = torch.linalg.qr(A.to(dtype).T)
    Uc, S, Vhc = torch.linalg.svd(scale * (RB.double() @ RA.double().T), full_matrices=False)
    return FactoredSVD(QB, Uc, S, Vhc, QA)


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The singular values of s·B·A, descending, float64; at most r of them (the rest are zero)."""
    B, A = flat(B, A)
    dtype = _compute_dtype(B)
    RB = torch.linalg.qr(B.to(dtype), mode="r")[1]
    RA = torch.linalg.qr(A.to(dtype).T, mode="r")[1]
    return torch.linalg.svdvals(abs(scale) * (RB.double() @ RA.double().T))


def kept_energy(S: torch.Tensor) -> torch.Tensor:
    """Fraction of ‖ΔW‖_F² = Σσ² kept by the best rank-k approximation, for k = 1..len(σ)."""
    energy = torch.cumsum(S.double() ** 2, 0)
    total = float(energy[-1]) if len(energy) else 0.0
    return energy / total if total > 0 else torch.ones_like(energy)


_TOL = 1e-12  # round-off allowance so that, e.g., energy=1.0 keeps every non-zero singular value

CRITERIA = ("rank", "energy", "max_rel_error", "sv_ratio")


def tail_errors(S: torch.Tensor) -> torch.Tensor:
    """Relative errors ‖ΔW − ΔW_k‖_F/‖ΔW‖_F for k = 1..len(σ), from reversed cumulative sums (no cancellation)."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return torch.zeros_like(sq)
    tails = torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,))
    return torch.sqrt(torch.cat([tails[1:], tails.new_zeros(1)]) / total)


def choose_rank(S: torch.Tensor, criterion: str, value: float) -> int:
    """The smallest rank k >= 1 meeting ``criterion`` (one of :data:`CRITERIA`), from σ descending.

    ``rank``: min(value, len(σ)); ``energy``: kept fraction of Σσ² >= value; ``max_rel_error``:
    ‖ΔW − ΔW_k‖_F/‖ΔW‖_F <= value; ``sv_ratio``: keep every σ_i >= σ_1/value.  A zero ΔW gets rank 1.
    """
    n = len(S)
    if n == 0 or float(S[0]) == 0.0:
        return 1
    if criterion == "rank":
        return max(1, min(int(value), n))
    if criterion == "sv_ratio":
        return max(1, int((S.double() >= float(S[0]) / value * (1 - _TOL)).sum()))
    if criterion == "energy":
        met = kept_energy(S) >= value - _TOL
    else:
        met = tail_errors(S) <= value + _TOL
    return int(torch.nonzero(met)[0]) + 1
