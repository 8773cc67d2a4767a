"""Linear algebra on factored low-rank matrices ΔW = s·B·A, never forming ΔW.

Shapes: B is (m, r), A is (r, n); conv factors are flattened first (see :func:`flat`).
Everything here costs O((m+n)·r²) time and O((m+n)·r) memory instead of O(m·n).  A rank above
min(m, n) is absurd for the shapes (a 5 MB file can claim r = 20000 on 64 x 64 factors, whose r x r
Gram matrices would take 3 GB each): such factors are first replaced exactly by rank-min(m, n) ones
(:func:`reduced`), so no r x r matrix is ever allocated for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def flat(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View conv factors B (out, r, 1, ...) and A (r, in, kh, ...) as matrices (out, r) and (r, in·kh·...)."""
    return B.reshape(B.shape[0], B.shape[1]), A.reshape(A.shape[0], -1)


def reduced(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors of the same B·A with rank at most min(m, n), in ``dtype`` (default: the factors').

    When r <= min(m, n) these are the flat factors themselves.  Otherwise B·A (m x n) is formed once
    and paired with an identity: (I_m, B·A) when m <= n, else (B·A, I_n).  Since r > min(m, n), B·A
    has fewer entries than the factors (m·n < r·max(m, n)), so this never allocates more than the
    input holds, and every later r x r product becomes min(m, n) x min(m, n).
    """
    B, A = flat(B, A)
    dtype = dtype or B.dtype
    m, r, n = int(B.shape[0]), int(B.shape[1]), int(A.shape[1])
    if r <= min(m, n):
        return B.to(dtype), A.to(dtype)
    dense = B.to(dtype) @ A.to(dtype)
    if m <= n:
        return torch.eye(m, dtype=dtype), dense
    return dense, torch.eye(n, dtype=dtype)


def inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product ⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)), in float64 (ranks reduced first)."""
    B1, A1 = reduced(B1, A1, torch.float64)
    B2, A2 = reduced(B2, A2, torch.float64)
    return float(torch.sum((B1.T @ B2) * (A1 @ A2.T)))


def frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F = sqrt(tr((BᵀB)(AAᵀ))), in float64 (clamped at 0 against round-off)."""
    return max(inner(B, A, B, A), 0.0) ** 0.5


@dataclass(frozen=True)
class FactoredSVD:
    """The SVD of ΔW = s·B·A kept in factored form, from B = Q_B·R_B and Aᵀ = Q_A·R_A.

    ``S`` (t) and the core's singular vectors ``Uc`` (p, t), ``Vhc`` (t, q) come from the SVD of
    s·R_B·R_Aᵀ = Uc·diag(σ)·Vhc (float64, t = min(p, q) <= r).  The singular vectors of ΔW are never
    built whole: since ΔW·vᵢ = σᵢ·uᵢ and A·vᵢ = R_Aᵀ·Vcᵢ, the kept ones are uᵢ = s·B·R_Aᵀ·Vcᵢ/σᵢ and
    vᵢ = s·Aᵀ·R_Bᵀ·Ucᵢ/σᵢ: one skinny product per factor, and Q_B, Q_A are never formed.
    """

    B: torch.Tensor
    A: torch.Tensor
    RB: torch.Tensor
    RA: torch.Tensor
    Uc: torch.Tensor
    S: torch.Tensor
    Vhc: torch.Tensor
    scale: float

    def _weights(self, k: int, power: float) -> torch.Tensor:
        """s·σᵢ^power/σᵢ for the first k σ (0 where σᵢ = 0), float64."""
        S = self.S[:k]
        return self.scale * torch.where(S > 0, S ** (power - 1), torch.zeros_like(S))

    def left(self, k: int, power: float = 0.0) -> torch.Tensor:
        """U_k·diag(σ^power), (m, k): s·B·R_Aᵀ·Vc_k·diag(σ^(power-1)), in B's dtype."""
        small = (self.RA.T @ self.Vhc[:k].T) * self._weights(k, power)
        return self.B @ small.to(self.B.dtype)

    def right(self, k: int, power: float = 0.0) -> torch.Tensor:
        """diag(σ^power)·V_kᵀ, (k, n): s·diag(σ^(power-1))·Uc_kᵀ·R_B·A, in A's dtype."""
        small = self._weights(k, power)[:, None] * (self.Uc[:, :k].T @ self.RB)
        return small.to(self.A.dtype) @ self.A

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced factors of the best rank-k approximation: B' = U_k·√σ (m, k), A' = √σ·V_kᵀ (k, n)."""
        return self.left(k, 0.5), self.right(k, 0.5)

    def truncate(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U (m, k), σ (k), Vᵀ (k, n) of the best rank-k approximation (Eckart–Young), in B's dtype."""
        return self.left(k), self.S[:k].to(self.B.dtype), self.right(k)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _r_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat factors (rank-reduced) in the compute dtype and the float64 R factors of B and Aᵀ (Q is not formed)."""
    B, A = reduced(B, A, _compute_dtype(B))
    RB = torch.linalg.qr(B, mode="r")[1].double()
    RA = torch.linalg.qr(A.T, mode="r")[1].double()
    return B, A, RB, RA


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> FactoredSVD:
    """SVD of ΔW = s·B·A from QRs of B and Aᵀ and an SVD of the small core s·R_B·R_Aᵀ.

    Costs O((m+n)·r²) instead of the O(m·n·min(m, n)) of a dense SVD.  The QRs run in float32
    (float64 if the factors are) and are backward stable; the r x r core is float64.  Conv factors
    are flattened first.
    """
    B, A, RB, RA = _r_factors(B, A)
    Uc, S, Vhc = torch.linalg.svd(scale * (RB @ RA.T), full_matrices=False)
    return FactoredSVD(B, A, RB, RA, Uc, S, Vhc, float(scale))


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The singular values of s·B·A, descending, float64; at most r of them (the rest are zero)."""
    _, _, RB, RA = _r_factors(B, A)
    return torch.linalg.svdvals(abs(scale) * (RB @ RA.T))


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
