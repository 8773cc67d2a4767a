"""Singular-value spectra of an adapter's modules, to pick a resize rank by looking.

Spectra come from the factors (:func:`loratools.linalg.singular_values`), so a 7B-scale adapter's
spectrum takes well under a second.  The optional plot needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import DependencyError
from ..io.atomic import atomic_output
from ..linalg import choose_rank, kept_energy, singular_values
from ..spec import ENERGY_LEVELS


@dataclass(frozen=True)
class ModuleSpectrum:
    """Singular values σ₁ >= σ₂ >= ... of one module's ΔW = s·B·A (at most r of them)."""

    module: str
    rank: int
    singular_values: tuple[float, ...]

    def rank_for(self, energy: float) -> int:
        """The smallest rank keeping ``energy`` of ‖ΔW‖_F² (what ``resize --energy`` would choose)."""
        return choose_rank(torch.tensor(self.singular_values, dtype=torch.float64), "energy", energy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "rank": self.rank,
            "singular_values": list(self.singular_values),
            "rank_for_energy": {str(e): self.rank_for(e) for e in ENERGY_LEVELS},
        }


def spectra(adapter: Adapter) -> list[ModuleSpectrum]:
    """One :class:`ModuleSpectrum` per module, in the adapter's module order."""
    out = []
    for name, m in adapter.modules.items():  # a parameter module's σ are all its experts' σ
        values = torch.cat([singular_values(B, A, m.scale) for B, A in m.blocks()]).sort(descending=True).values
        out.append(ModuleSpectrum(name, m.rank, tuple(float(s) for s in values)))
    return out


def plot_spectrum(spectra: Sequence[ModuleSpectrum], path: str | Path, *, force: bool = False) -> Path:
    """Write a PNG of kept energy (fraction of ‖ΔW‖_F²) versus rank, one line per module."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("plotting needs matplotlib: pip install 'loratools[plot]'") from None

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in spectra:
        energy = kept_energy(torch.tensor(s.singular_values, dtype=torch.float64))
        ax.plot(
            range(1, len(energy) + 1),
            energy.numpy(),
            alpha=0.4 if len(spectra) > 10 else 0.9,
            linewidth=1,
            label=s.module if len(spectra) <= 10 else None,
        )
    for level in ENERGY_LEVELS:
        ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="rank k", ylabel="kept energy (fraction of ‖ΔW‖²)", title=f"LoRA spectrum ({len(spectra)} modules)", ylim=(0, 1.01))
    if len(spectra) <= 10:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path, force=force, directory=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
