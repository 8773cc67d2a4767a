"""LyCORIS LoHa modules (``hada_*`` tensors) as an exact plain LoRA factorisation.

LyCORIS 4.1.3 (``lycoris/modules/loha.py``, ``functional/loha.py``) applies
ΔW = scale·((w1a·w1b) ⊙ (w2a·w2b)) reshaped to the weight, with w1a = ``hada_w1_a`` (out x r),
w1b = ``hada_w1_b`` (r x in[·kh·kw]), and scale = alpha/r (a missing alpha, or 0, means alpha = r).
With Tucker cores ``hada_t1``/``hada_t2`` (r x r x kh x kw) each half is
einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a), w_a then being r x out.

A Hadamard product of two rank-r products is itself a product of rank r1·r2 (the face-splitting
identity (U1V1) ⊙ (U2V2) = (U1 • U2)(V1 ∗ V2): row-wise Kronecker of the ups, column-wise of the
downs), so a LoHa module is read exactly as a LoRA module of rank r1·r2, no SVD involved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import spec
from ..adapter import LoraModule

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def half(w_a: torch.Tensor, w_b: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Hadamard half as (up, down): up (out x r), down (r x in[ x kh x kw]), in float32."""
    if t is None:
        return w_a.float(), w_b.float()
    # Σ_i w_a[i, p] · (Σ_j t[i, j, ...] w_b[j, q]): the up is w_aᵀ, the down the core times w_b
    return w_a.float().T, torch.einsum("ij...,jq->iq...", t.float(), w_b.float())


def factor_numel(t: Mapping[str, torch.Tensor]) -> int:
    """How many elements :func:`module`'s factors will hold, from the shapes alone (0 if they are malformed)."""
    try:
        total_rank, rows, cols = 1, 0, 0
        for n in ("1", "2"):
            a, b, core = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"], t.get(f"hada_t{n}")
            total_rank *= int(b.shape[0])
            rows = int(a.shape[1] if core is not None else a.shape[0])
            cols = int(b.shape[1]) * (int(core[0, 0].numel()) if core is not None else int(b[0].numel()) // int(b.shape[1]))
        return total_rank * (rows + cols)
    except (KeyError, IndexError):
        return 0


def module(t: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[LoraModule | None, str | None]:
    """The exact LoRA module of LoHa tensors ``t`` (suffix -> tensor), or why they are not a LoHa module."""
    missing = [s for s in SUFFIXES[:4] if s not in t]
    if missing:
        return None, f"LoHa module lacks {', '.join(missing)}"
    if ("hada_t1" in t) != ("hada_t2" in t):
        return None, "LoHa module has one Tucker core of hada_t1/hada_t2 but not the other"
    try:
        B1, A1 = half(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
        B2, A2 = half(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
    except RuntimeError as err:
        return None, f"LoHa factors do not chain ({err})"
    r = int(t["hada_w1_b"].shape[0])
    if B1.dim() != 2 or B1.shape != (B1.shape[0], A1.shape[0]) or B2.shape != (B1.shape[0], A2.shape[0]) or A1.shape[1:] != A2.shape[1:]:
        return None, (f"LoHa shapes do not form one weight: w1 {list(B1.shape)}·{list(A1.shape)}, w2 {list(B2.shape)}·{list(A2.shape)}")
    if int(t["hada_w2_b"].shape[0]) != r:
        return None, f"hada_w1_b has rank {r} but hada_w2_b rank {int(t['hada_w2_b'].shape[0])}; LyCORIS uses one rank"
    scale = 1.0 if not alpha else alpha / r  # lycoris/modules/loha.py: alpha None or 0 means alpha = lora_dim
    out, r1, r2 = B1.shape[0], B1.shape[1], B2.shape[1]
    B = (B1[:, :, None] * B2[:, None, :]).reshape(out, r1 * r2)
    a1, a2 = A1.reshape(r1, -1), A2.reshape(r2, -1)
    A = (a1[:, None, :] * a2[None, :, :]).reshape(r1 * r2, *A1.shape[1:])
    rank = r1 * r2
    if A.dim() > 2:
        B = B.reshape(out, rank, 1, 1)
    return LoraModule(A.contiguous(), B.contiguous(), spec.alpha_for(scale, rank), False, "conv" if A.dim() > 2 else "linear"), None
