"""What is inside an adapter: per-module shapes, ranks, scales and ‖ΔW‖_F, and totals.

‖ΔW‖_F comes from the factors (see :mod:`loratools.linalg`), so inspecting a 7B-scale adapter
never forms a 4096 x 11008 matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .. import metadata, spec
from ..adapter import Adapter
from ..io.tensorfile import DTYPE_NAMES
from ..linalg import frobenius_norm

# the embedded config (shown as the module table) and what readers add (not in the file)
_NOT_SHOWN = (spec.META_CONFIG, spec.META_SOURCE, spec.META_PREFIX)


@dataclass(frozen=True)
class ModuleSummary:
    """One row of ``loratools inspect``; ``shape`` is ΔW's (out, in[, k...]) before any transpose."""

    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    dtype: str
    delta_norm: float
    dora: bool
    dora_axis: str | None  # "out" (PEFT's, per output feature) or "in" (kohya/LyCORIS wd_on_output=False); None without DoRA


@dataclass(frozen=True)
class Summary:
    """Per-module rows and adapter totals."""

    modules: list[ModuleSummary]
    num_params: int
    num_bytes: int
    targets: Any
    base_model: str | None
    spec_version: str
    peft_type: str
    metadata: dict[str, str]  # the file's safetensors metadata, but the embedded PEFT config and read-time marks
    training: dict[str, Any]  # trigger phrase, tags by frequency, main ss_*/modelspec.* facts (loratools.metadata.describe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(adapter: Adapter) -> Summary:
    """Summarize ``adapter``: one :class:`ModuleSummary` per module plus totals."""
    rows = []
    for name, m in adapter.modules.items():
        out, inp = int(m.B.shape[0]), int(m.A[0].numel())
        rows.append(
            ModuleSummary(
                module=name,
                kind=m.kind,
                shape=m.delta_shape() if m.kind == "parameter" else (out, inp) if m.kind != "conv" else (out, *m.A.shape[1:]),
                rank=m.rank,
                alpha=m.alpha,
                scale=m.scale,
                dtype=DTYPE_NAMES.get(m.dtype, str(m.dtype)),
                delta_norm=m.scale * sum(frobenius_norm(B, A) ** 2 for B, A in m.blocks()) ** 0.5,
                dora=m.magnitude is not None,
                dora_axis=m.magnitude_axis if m.magnitude is not None else None,
            )
        )
    tensors = adapter.state_dict().values()
    config = adapter.peft_config()
    return Summary(
        modules=rows,
        num_params=sum(t.numel() for t in tensors),
        num_bytes=sum(t.numel() * t.element_size() for t in tensors),
        targets=config.get("target_modules"),
        base_model=adapter.base_model,
        spec_version=adapter.metadata.get(spec.META_VERSION, "1.0 (plain PEFT, no version recorded)"),
        peft_type=config.get("peft_type", "LORA"),
        metadata={k: v for k, v in adapter.metadata.items() if k not in _NOT_SHOWN},
        training=metadata.describe(adapter.metadata),
    )
