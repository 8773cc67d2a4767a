"""What a base checkpoint holds, by header only: tensors, bytes, dtypes, and its quantization.

``loratools inspect BASE`` shows it: which parameters a codec reads (and how), which tensors look
quantized in a format no codec reads (a merge into them is refused), so a user knows before a merge
whether ``--dtype keep`` will requantize and what ``--dtype bf16`` would dequantize.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.checkpoint import open_checkpoint
from ..io.quant.registry import codec, reader, scan


@dataclass(frozen=True)
class BaseSummary:
    """A base checkpoint at a glance; ``quantization`` is empty for a float checkpoint."""

    path: str
    shards: int
    tensors: int
    total_bytes: int
    dtypes: dict[str, int]  # stored dtype -> tensors
    model_type: str | None
    quantization: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_base(path: str | Path) -> BaseSummary:
    """The header-only summary of the base checkpoint at ``path`` (a model directory or one ``.safetensors`` file)."""
    checkpoint = open_checkpoint(path)
    config = checkpoint.model_config()
    quant = scan(config, checkpoint.tensors, reader(checkpoint))
    quantization: dict[str, Any] = {}
    if quant:
        formats: dict[str, dict[str, Any]] = {}
        for q in quant.params.values():
            entry = formats.setdefault(q.label, {"codec": q.codec, "requantizable": codec(q.codec).requantizable, "tensors": 0})
            entry["tensors"] += 1
        quantization = {
            "method": quant.method,
            "formats": formats,
            "unhandled": dict(sorted(quant.unhandled.items())),
            "problems": [f"{p.where}: {p.message}" for p in quant.problems],
        }
    dtypes = Counter(t.dtype for t in checkpoint.tensors.values())
    model_type = config.get("model_type") if config else None
    return BaseSummary(
        str(path),
        len(checkpoint.shards),
        len(checkpoint.tensors),
        checkpoint.total_bytes,
        dict(sorted(dtypes.items())),
        model_type if isinstance(model_type, str) else None,
        quantization,
    )
