"""DELLA-Merging (Deep et al., "Reducing Interference in Model Merging through Magnitude-Based Sampling", arXiv:2406.11617).

MAGPRUNE: within each row of ΔWᵢ (an output feature: a row of B·A), entries are ranked by |x|
(rank ρ = 0 for the smallest, n − 1 for the largest; ties by position) and kept with probability
pⱼ = (p − ε) + 2ε·ρⱼ/(n − 1) (p = density; a one-entry row keeps with p), so larger entries
survive more often and the mean keep rate stays p; kept entries are rescaled by 1/pⱼ
(the paper's 1/(1 − drop probability)), so E[τᵢ] = ΔWᵢ.  Then TIES's sign election and disjoint
mean: ΔW = Σ_{i agreeing} wᵢ·τᵢ / |{i agreeing}|.  ``della_linear`` (:mod:`.della_linear`) sums
instead: ΔW = Σ wᵢ·τᵢ.

mergekit 0.1.5 (``sparsify.della_magprune``, ``merge_methods/registry.py``) ranks the same way
(rank_norm = (rank − min)/(max − min)) with the same window, but by default rescales each τᵢ to
ΔWᵢ's L1 norm instead of 1/pⱼ, and its ``della`` divides by the sum of the agreeing weights; with
weights 1 and ``rescale: false`` its mask has the same law (it draws ``torch.bernoulli``, we draw
uniforms as DARE does, so seeds give different samples).  Drops are seeded by (seed, module);
ε defaults to mergekit's 0.15 and needs 0 < p − ε and p + ε <= 1.
"""

from __future__ import annotations

from concurrent.futures import Executor

import torch

from .base import Kept, Method, MethodOptions, ties_mean

_ROWS = 1 << 19  # elements of rows ranked at once: bounds the int64 sort temporaries


def select_della(delta: torch.Tensor, options: MethodOptions, gen: torch.Generator | None, pool: Executor | None = None) -> Kept:
    """MAGPRUNE as a :class:`Kept`: per-row magnitude-ranked keep probabilities, kept entries divided by theirs."""
    p, eps = options.density, options.epsilon
    if p >= 1:
        return Kept()
    matrix = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    uniform = torch.rand(matrix.shape, generator=gen, device=delta.device, dtype=delta.dtype)  # drawn first: one stream
    probability = torch.empty_like(matrix)
    rows, n = matrix.shape
    step = max(1, _ROWS // max(1, n))

    def rank(r0: int) -> None:
        block = matrix[r0 : r0 + step]
        order = torch.argsort(block.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
        share = ranks.to(delta.dtype) / (n - 1) if n > 1 else torch.full_like(block, 0.5)
        probability[r0 : r0 + step] = (p - eps) + share * (2 * eps)

    list((pool.map if pool is not None else map)(rank, range(0, rows, step)))
    keep = torch.lt(uniform, probability, out=uniform)  # float 0/1, in place
    return Kept(mask=keep.reshape(delta.shape), divisor=probability.reshape(delta.shape))


METHOD = Method(
    "della",
    select_della,
    ties_mean,
    uses_density=True,
    uses_sign=True,
    random=True,
    paper="arXiv:2406.11617",
    uses_epsilon=True,
    rowwise=True,
)
