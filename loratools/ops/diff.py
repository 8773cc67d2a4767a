"""Compare two adapters module by module: how aligned and how large their ΔW are, from the factors.

cos(ΔW_A, ΔW_B) = ⟨ΔW_A, ΔW_B⟩_F / (‖ΔW_A‖_F ‖ΔW_B‖_F), with ⟨s₁B₁A₁, s₂B₂A₂⟩ = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))
(:func:`loratools.linalg.inner`), so a 4096 x 11008 module costs O((m+n)·r²), never the dense ΔW.
DoRA magnitudes are not part of ΔW here: the comparison is of the low-rank directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import Adapter, LoraModule
from ..api import load
from ..linalg import frobenius_norm, inner


@dataclass(frozen=True)
class ModuleDiff:
    """One module in both adapters: cosine of their ΔW (None if either is zero) and ‖ΔW_A‖/‖ΔW_B‖."""

    module: str
    cosine: float | None
    norm_a: float
    norm_b: float
    norm_ratio: float | None
    rank_a: int
    rank_b: int


@dataclass(frozen=True)
class DiffReport:
    """Modules in both adapters, modules in only one, and modules whose ΔW shapes disagree."""

    modules: list[ModuleDiff]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff(a: Adapter | str | Path, b: Adapter | str | Path, *, base: str | Path | None = None) -> DiffReport:
    """Compare adapters ``a`` and ``b`` (values or paths; ``base`` maps kohya names when loading paths)."""
    a = a if isinstance(a, Adapter) else load(a, base=base)
    b = b if isinstance(b, Adapter) else load(b, base=base)
    rows, mismatched = [], {}
    for name, ma in a.modules.items():
        mb = b.modules.get(name)
        if mb is None:
            continue
        sa, sb = ma.delta_shape(fan_in_fan_out=a.fan_in_fan_out), mb.delta_shape(fan_in_fan_out=b.fan_in_fan_out)
        if sa != sb or ma.kind != mb.kind:
            mismatched[name] = f"ΔW is {ma.kind} {list(sa)} in A but {mb.kind} {list(sb)} in B"
            continue
        rows.append(_compare(name, ma, mb))
    only_a = [n for n in a.modules if n not in b.modules]
    only_b = [n for n in b.modules if n not in a.modules]
    return DiffReport(rows, only_a, only_b, mismatched)


def _compare(name: str, ma: LoraModule, mb: LoraModule) -> ModuleDiff:
    cross = ma.scale * mb.scale * sum(inner(*x, *y) for x, y in zip(ma.blocks(), mb.blocks(), strict=True))
    na = abs(ma.scale) * sum(frobenius_norm(*x) ** 2 for x in ma.blocks()) ** 0.5
    nb = abs(mb.scale) * sum(frobenius_norm(*y) ** 2 for y in mb.blocks()) ** 0.5
    cosine = max(-1.0, min(1.0, cross / (na * nb))) if na > 0 and nb > 0 else None
    return ModuleDiff(name, cosine, na, nb, na / nb if nb > 0 else None, ma.rank, mb.rank)
