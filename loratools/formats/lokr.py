"""LyCORIS LoKr modules (``lokr_*`` tensors) as an exact plain LoRA factorisation.

LyCORIS 4.1.3 (``lycoris/modules/lokr.py`` ``get_weight``, ``functional/lokr.py`` ``_kron_weight``)
applies ΔW = scale·kron(w1, w2) (w1 padded with trailing unit axes to w2's dims) reshaped to the weight: w1 = ``lokr_w1`` (a x c) or
``lokr_w1_a``·``lokr_w1_b``; w2 = ``lokr_w2`` (b x d[ x kh x kw]), ``lokr_w2_a``·``lokr_w2_b``, or
with Tucker core ``lokr_t2`` einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b).  scale =
alpha/r with r the rank of the factorised halves (missing alpha, or 0, means alpha = r); with both
halves full matrices there is no rank and the scale is 1.  (4.1.3's ``get_diff_weight`` multiplies
by the scale a second time; its forward, ``_rebuild_forward``, and every merge use it once, as here.)

By the mixed-product rule kron(U1V1, U2V2) = kron(U1, U2)·kron(V1, V2), a LoKr module is read
exactly as a LoRA module of rank r1·r2 (a full half of a x c counts as rank min(a, c), factored
against an identity), no SVD involved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import spec
from ..adapter import LoraModule

SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full half (rows x cols[ x kh x kw]) as (up, down) against an identity on its shorter side."""
    w = w.float()
    rows, cols = int(w.shape[0]), int(w[0].numel())
    if rows <= cols:
        return torch.eye(rows), w
    return w.reshape(rows, cols), torch.eye(cols).reshape(cols, *w.shape[1:])


def _half(t: Mapping[str, torch.Tensor], n: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Half ``n`` ("1" or "2") as (up, down, rank of its factors or None for a full matrix)."""
    if f"lokr_w{n}" in t:
        up, down = _full(t[f"lokr_w{n}"])
        return up, down, None
    a, b = t[f"lokr_w{n}_a"].float(), t[f"lokr_w{n}_b"].float()
    if n == "2" and "lokr_t2" in t:  # Σ_i w2_a[i, p] · (Σ_j t2[i, j, ...] w2_b[j, q])
        return a.T.contiguous(), torch.einsum("ij...,jq->iq...", t["lokr_t2"].float(), b), int(b.shape[0])
    return a, b, int(b.shape[0])


def factor_numel(t: Mapping[str, torch.Tensor]) -> int:
    """How many elements :func:`module`'s factors will hold, from the shapes alone (0 if they are malformed)."""
    try:
        rank, rows, cols = 1, 1, 1
        for n in ("1", "2"):
            if f"lokr_w{n}" in t:
                w = t[f"lokr_w{n}"]
                r, o, i = min(int(w.shape[0]), int(w[0].numel())), int(w.shape[0]), int(w[0].numel())
            else:
                a, b, core = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"], t.get("lokr_t2") if n == "2" else None
                r, o = int(b.shape[0]), int(a.shape[1] if core is not None else a.shape[0])
                i = int(b.shape[1]) * int(core[0, 0].numel()) if core is not None else int(b[0].numel())
            rank, rows, cols = rank * r, rows * o, cols * i
        return rank * (rows + cols)
    except (KeyError, IndexError):
        return 0


def module(t: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[LoraModule | None, str | None]:
    """The exact LoRA module of LoKr tensors ``t`` (suffix -> tensor), or why they are not a LoKr module."""
    for n in ("1", "2"):
        full, parts = f"lokr_w{n}" in t, (f"lokr_w{n}_a" in t, f"lokr_w{n}_b" in t)
        if full == any(parts) or (any(parts) and not all(parts)):
            return None, f"LoKr half {n} needs lokr_w{n}, or both lokr_w{n}_a and lokr_w{n}_b"
    if "lokr_t2" in t and "lokr_w2" in t:
        return None, "lokr_t2 belongs to a factorised lokr_w2_a/lokr_w2_b half, not a full lokr_w2"
    try:
        U1, V1, r1 = _half(t, "1")
        U2, V2, r2 = _half(t, "2")
        if U1.shape[1] != V1.shape[0] or U2.shape[1] != V2.shape[0] or V1.dim() != 2:
            raise RuntimeError(f"w1 {list(U1.shape)}·{list(V1.shape)}, w2 {list(U2.shape)}·{list(V2.shape)}")
    except RuntimeError as err:
        return None, f"LoKr factors do not chain ({err})"
    ranks = {r for r in (r1, r2) if r is not None}
    if len(ranks) > 1:
        return None, f"LoKr halves have ranks {sorted(ranks)}; LyCORIS uses one rank"
    # lycoris/modules/lokr.py: both halves full -> alpha = lora_dim (scale 1); alpha None or 0 -> alpha = lora_dim
    scale = alpha / ranks.pop() if ranks and alpha else 1.0
    B = torch.kron(U1.contiguous(), U2.contiguous())
    k = tuple(V2.shape[2:])
    A = torch.kron(V1.contiguous(), V2.reshape(V2.shape[0], -1).contiguous())  # kron(w1, w2) over (c, d·kh·kw) is the 4-D kron flattened
    rank = int(B.shape[1])
    if k:
        A = A.reshape(rank, -1, *k)
        B = B.reshape(B.shape[0], rank, 1, 1)
    return LoraModule(A.contiguous(), B.contiguous(), spec.alpha_for(scale, rank), False, "conv" if k else "linear"), None
