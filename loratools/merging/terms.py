"""One adapter's contribution to one base tensor, as rows on demand: the unit every merge kernel adds.

A term computes rows ``r0:r1`` of ``scale·B·A`` in float32 in the stored layout, as PEFT does:
(B·A) first, then ·s.  ``BLOCK`` is the CPU row block every merge path works in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BLOCK = 1 << 19  # float32 elements per CPU row block: a few MiB, so temporaries stay in cache


@dataclass(frozen=True)
class RowTerm:
    """One adapter's contribution ``scale·B·A`` to one base tensor, in float32.

    ``transposed``: the base stores (B·A)ᵀ (``fan_in_fan_out`` linears, embeddings), so base row i
    is column i of B·A.  ``rounded``: ΔW is rounded to the stored dtype before it is added, as PEFT
    does for (non-DoRA) embeddings only.  A bias term is B = b as a column and A = [[1]].
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    transposed: bool = False
    rounded: bool = False

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ΔW in the stored layout, computed as PEFT does: (B·A) first, then ·s.

        ``out``: a flat float32 scratch buffer to compute into (saves an allocation per block).
        """
        B, A = (self.B, self.A[:, r0:r1]) if self.transposed else (self.B[r0:r1], self.A)
        shape = (B.shape[0], A.shape[1])
        delta = torch.mm(B, A, out=out[: shape[0] * shape[1]].view(shape)) if out is not None else B @ A
        return (delta.T if self.transposed else delta).mul_(self.scale)

    def to(self, device: torch.device) -> RowTerm:
        return replace(self, B=self.B.to(device), A=self.A.to(device))


@dataclass(frozen=True)
class ExpertRowTerm(RowTerm):
    """``scale·B[e]·A[e]`` for a fused 3-D expert tensor (E, d1, d2), streamed as E rows of d1·d2.

    B (E, out, r), A (E, r, in); ``swapped``: the base stores ΔW[e]ᵀ (gpt-oss).  ``transposed``
    stays False: it speaks of the stored 2-D view, where row e is expert e either way.
    """

    swapped: bool = False

    def rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        delta = torch.bmm(self.B[r0:r1], self.A[r0:r1])
        return (delta.transpose(1, 2) if self.swapped else delta).reshape(r1 - r0, -1).mul_(self.scale)
