"""The merge-method interface and the steps methods share: trim, drop, elect sign, disjoint mean.

Each step's definition follows PEFT 0.21 (``peft/utils/merge_utils.py``), the peer whose
``add_weighted_adapter`` results tests compare against: density is the kept fraction of entries of
each ΔWᵢ, k = ⌊density·numel⌋ by magnitude over the whole tensor; the sign is elected on the
trimmed, *unweighted* ΔWᵢ; the disjoint mean divides the weighted sum of agreeing entries by how
many inputs agree (at least 1).  Every step sees one module's whole ΔW, never a row block, because
trimming by magnitude ranks the whole tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ArgumentError
from ..spec import MAJORITY_SIGN_CHOICES

MAJORITY_SIGNS = MAJORITY_SIGN_CHOICES

# combine(deltas, weights, options, generator) -> ΔW; deltas share one shape, float32 or float64.
Combine = Callable[[Sequence[torch.Tensor], Sequence[float], "MethodOptions", "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class MethodOptions:
    """A method's knobs: kept fraction ``density`` in (0, 1], sign election rule, seed of random drops."""

    density: float = 1.0
    majority_sign: str = "total"
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """One merge method: its name, its combine step, which options it reads, and where it comes from."""

    name: str
    combine: Combine
    uses_density: bool
    uses_sign: bool
    random: bool
    paper: str

    def check(self, options: MethodOptions, *, density_given: bool, sign_given: bool) -> None:
        """Refuse options this method does not read (a silent no-op would hide a mistake) and out-of-range ones."""
        if density_given and not self.uses_density:
            raise ArgumentError(f"method {self.name} has no density (use ties, dare, dare_ties or magnitude_prune)")
        if sign_given and not self.uses_sign:
            raise ArgumentError(f"method {self.name} elects no sign, so --majority-sign does not apply")
        d = options.density
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and 0 < d <= 1):
            raise ArgumentError(f"density must be in (0, 1], got {d!r}")
        if options.majority_sign not in MAJORITY_SIGNS:
            raise ArgumentError(f"majority sign must be one of {', '.join(MAJORITY_SIGNS)}, got {options.majority_sign!r}")


def module_generator(seed: int, module: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, module name): reproducible per module whatever order modules run in.

    ``add`` and ``merge`` run modules in different orders and threads; deriving each module's stream
    from its name gives both the same drops for the same seed.
    """
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ, accumulated in input order."""
    total = deltas[0] * weights[0]
    for delta, w in zip(deltas[1:], weights[1:], strict=True):
        total = total + delta * w
    return total


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·numel⌋ entries of largest |x| over the whole tensor, zero the rest (density 1: unchanged).

    The k-th largest |x| is found by ``kthvalue`` (about 3x faster than ``topk`` on CPU for 10M entries);
    when exactly k entries reach it, they are topk's set.  If magnitudes tie at the threshold, the
    set is ambiguous and ``topk`` picks, as PEFT does (``merge_utils.magnitude_based_pruning``).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude >= threshold
    if int(keep.sum()) != k:
        keep = torch.zeros_like(keep)
        keep[torch.topk(magnitude, k, largest=True).indices] = True
    return torch.where(keep.reshape(delta.shape), delta, torch.zeros_like(delta))


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` (independently), rescale kept ones by 1/density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=delta.dtype) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elect_sign(stacked: torch.Tensor, rule: str) -> torch.Tensor:
    """Mask of entries agreeing with the elected sign; ``stacked`` is (inputs, ...).

    ``total``: the sign of Σ ΔWᵢ; ``frequency``: the sign held by more inputs; ties elect +.  A zero
    entry (trimmed or dropped) agrees with neither sign, so it never counts in the mean.
    """
    signs = stacked.sign()
    votes = stacked.sum(0) if rule == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float], agree: torch.Tensor) -> torch.Tensor:
    """Σ over agreeing inputs of wᵢ·ΔWᵢ, divided by how many agree (at least 1)."""
    weighted = torch.stack([d * w for d, w in zip(deltas, weights, strict=True)])
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
