"""The quantization codec interface: how a quantized base tensor is read as float32 and written back.

A quantized checkpoint stores one model parameter as several tensors: FP8 ``q_proj.weight`` plus its
``q_proj.weight_scale_inv`` block scales, or GPTQ's ``q_proj.qweight``/``qzeros``/``scales``/``g_idx``,
or gpt-oss' ``experts.gate_up_proj_blocks``/``_scales`` for a parameter ``experts.gate_up_proj`` that
is not stored under its own name at all.  ΔW must never be added to those stored values; it is added
to ``dequantize(parts)`` in float32, and the sum is stored again by ``quantize`` (fresh scales by
the format's own rule) or written dequantized.

Contract (stable: later changes are additive only):

- A :class:`Codec` is one module-level instance in ``loratools/io/quant/<name>.py``, listed once in
  ``registry.CODECS``.  It is stateless; everything about one tensor lives in its :class:`QuantTensor`.
- ``codec.claims(qconfig, tensors)`` looks at ``config.json``'s ``quantization_config`` (or None) and
  every tensor header of the checkpoint, and returns the :class:`QuantTensor` of each parameter it
  stores, keyed by the parameter's *logical* key (the key a float checkpoint would use), plus a
  :class:`~loratools.errors.Problem` for each tensor that looks like its format but is malformed
  (a scale of the wrong shape, a missing companion).  Claims come from the checkpoint itself:
  ``quantization_config`` narrows which codecs are asked, the tensors decide.
- Added later: ``codec.claims_reading(qconfig, tensors, read)`` is what ``registry.scan`` asks when
  it can read the checkpoint; by default it is ``claims``.  A format whose headers do not say a
  parameter's logical shape (bitsandbytes 4-bit keeps it in the bytes of a small JSON tensor)
  overrides it and reads such companions through ``read`` (a :data:`Reader`: whole tensors of at
  most :data:`SMALL_BYTES` each, a larger one raises :class:`QuantError` without being read; the
  codec checks sizes in the headers first and reports an oversized one as malformed).  Without a
  reader (``scan`` on headers alone) such a codec claims nothing, so its tensors stay refused.
- ``parts`` maps a *role* (``"weight"``, ``"weight_scale_inv"``, ``"qweight"``, ``"blocks"`` ...) to
  the stored checkpoint key.  ``QuantTensor.primary`` is the role whose tensor carries the data
  (streamed row block by row block); the others are companions (small, read whole).
- Rows are dimension 0 of the *logical* tensor.  ``codec.row_align(q)`` is the number of logical rows
  that one scale row covers (the FP8 block height, 1 for per-channel scales, ``shape[0]`` when one
  scale covers the whole tensor); row ranges handed to ``dequantize``/``quantize`` start at a
  multiple of it (the last range may be ragged).
- ``codec.dequantize(q, parts, rows)`` gets the *whole* stored tensors by role (memory-mapped views,
  so nothing is copied) and returns logical rows ``rows = (r0, r1)`` (all rows for None) as float32.
  It must equal the reference implementation transformers ships for the format, bit for bit.
- ``codec.quantize(q, w, rows, like)`` (``requantizable`` codecs only) stores float32 logical rows
  ``w`` (rows ``rows`` of the parameter) and returns, by role, the stored tensors' matching rows
  (``codec.part_rows(q, role, rows)``), with fresh scales by the format's rule; ``like`` is the
  original parts (their dtypes are kept).  Its output for ``rows`` dequantizes as parts of their own
  with rows ``(0, r1 - r0)`` (how the merge measures what survives).  ``rewritten(q)`` names the
  companion roles it returns; the others (static activation scales) pass through.
- ``codec.requantize(q, parts, rows, edit, out)`` (additive) is one merge row block: dequantize,
  ``edit``, quantize into ``out`` (each rewritten role's rows), and the two squared norms of the
  survival measure.  The default composes the three methods above; a codec may fuse them (FP8
  block scales do) as long as every written bit stays the same (the norms may be summed in
  another order).  Added later: the keyword ``low_rank`` (a :class:`LowRank`, or None) says that
  ``edit`` adds nothing but scaled low-rank products, so a codec may compute W' itself, fused
  with its decode.  A codec that does computes it by :class:`LowRank`'s rule (``LowRank.apply``
  is the reference), and then every byte it writes equals ``quantize(LowRank.apply(W))``; ΔW is
  the same sum as ``edit``'s, rounded in another order.
- For codecs that cannot be recomputed without calibration data (GPTQ, AWQ, bnb) ``requantizable``
  is False and ``quantize`` raises :class:`QuantError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import FormatError, Problem
from ..tensorfile import TensorInfo

Parts = Mapping[str, torch.Tensor]
"""Stored tensors of one parameter by role, as on disk (dtype and shape of the checkpoint)."""
Rows = tuple[int, int]
"""A half-open range ``(r0, r1)`` of logical rows (dimension 0)."""
Reader = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]
"""Reads small stored tensors whole by key (at most :data:`SMALL_BYTES` each, else :class:`QuantError`)."""
SMALL_BYTES = 1 << 16
"""The most bytes a :data:`Reader` reads of one tensor while claiming: companions, never weights."""
Edit = Callable[[torch.Tensor], torch.Tensor]
"""Float32 logical rows -> the merged float32 rows (a new tensor or a scratch view; its input is left as it was)."""


@dataclass(frozen=True)
class LowRank:
    """An :data:`Edit` that only adds low-rank terms: W' = (W + P₁·s₁) + P₂·s₂ + ..., in float32.

    Each term's product P = B·A is accumulated rank by rank, P = ((b₁a₁ + b₂a₂) + b₃a₃) + ...
    (each outer-product entry rounded, then added, from the first), then scaled, then added, in
    order: the same sum as the merge kernel's matrix product, with one rounding order that any
    device and any loop reproduces (a BLAS's order depends on the library and the CPU).
    ``terms``: (B rows of the row block (n, r), A (r, k), s), float32 on the CPU.
    """

    terms: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """W' from float32 rows ``w`` (left as they were), by the rule above, in torch: the reference a fused codec equals."""
        x = w.clone()
        for B, A, s in self.terms:
            if B.shape[1] == 0:
                continue
            product = B[:, :1] * A[:1]
            for o in range(1, B.shape[1]):
                product += B[:, o : o + 1] * A[o : o + 1]
            x += product * s
        return x

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The terms side by side, as compiled loops take them (``loratools.fused.e4m3.Terms``): B (n x R), A (R x k),
        each term's rank offsets (T + 1), its scales (T, float32)."""
        B = torch.cat([t[0] for t in self.terms], dim=1) if len(self.terms) > 1 else self.terms[0][0]
        A = torch.cat([t[1] for t in self.terms]) if len(self.terms) > 1 else self.terms[0][1]
        offsets = np.cumsum([0] + [t[0].shape[1] for t in self.terms], dtype=np.int64)
        factors = np.array([t[2] for t in self.terms], dtype=np.float32)
        return B.float().contiguous().numpy(), A.float().contiguous().numpy(), offsets, factors


QUANT_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I8", "U8", "I32", "I16", "U16", "U32", "F4")
"""Stored dtypes that can only be quantized data: a base weight of one of these no codec claims is refused."""

COMPANION_SUFFIXES = (
    ".weight_scale_inv",  # FP8 block scales (DeepSeek-V3, Qwen3-FP8, transformers "fp8")
    ".weight_scale",  # compressed-tensors FP8 / int (per tensor, channel or group)
    ".weight_zero_point",
    ".weight_global_scale",  # compressed-tensors NVFP4
    ".weight_packed",
    ".input_scale",  # static activation scales; a weight beside one is quantized
    "_blocks",  # MXFP4 (gpt-oss experts)
    "_scales",
    ".qweight",  # GPTQ / AWQ
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight.absmax",  # bitsandbytes 4-bit quant state
    ".weight.quant_map",
    ".weight.nested_absmax",
    ".weight.nested_quant_map",
    ".weight.quant_state.bitsandbytes__nf4",
    ".weight.quant_state.bitsandbytes__fp4",
    ".SCB",  # bitsandbytes int8
    ".weight_format",
)
"""Key endings that mark a tensor as part of a quantized parameter; the planner refuses a weight
beside one of them unless a codec claimed it, and never reports them as unmatched base tensors."""


class QuantError(FormatError):
    """A quantized tensor that cannot be read or written as asked (malformed parts, a format that cannot be requantized)."""


@dataclass(frozen=True)
class QuantTensor:
    """One model parameter stored quantized: its logical key and shape, and the stored tensors by role.

    ``label`` names the format for people ("FP8 e4m3, 128x128 block scales"); ``params`` holds what
    the codec read from the config and headers (block size, scale dtype, bits, group size ...).
    """

    key: str
    codec: str
    shape: tuple[int, ...]
    parts: Mapping[str, str]  # role -> stored checkpoint key
    primary: str  # the role that carries the data
    label: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def primary_key(self) -> str:
        """The stored key of the data tensor (``q_proj.weight`` for FP8, ``q_proj.qweight`` for GPTQ)."""
        return self.parts[self.primary]

    @property
    def companions(self) -> dict[str, str]:
        """Role -> stored key of every part except the primary one (scales, zero points, indices)."""
        return {role: key for role, key in self.parts.items() if role != self.primary}

    @property
    def stored_keys(self) -> tuple[str, ...]:
        return tuple(self.parts.values())


class Codec(ABC):
    """One quantized storage format.  Subclasses set ``name``, ``methods`` and ``requantizable``."""

    name: str = ""  # stable id, recorded per edit and in --json ("fp8-block")
    methods: tuple[str, ...] = ()  # quantization_config.quant_method values that select it
    requantizable: bool = False  # can quantize() recompute the format without calibration data

    @abstractmethod
    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        """The parameters this codec stores in ``tensors`` (logical key -> QuantTensor), and malformed ones."""

    def claims_reading(
        self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], read: Reader | None
    ) -> tuple[dict[str, QuantTensor], list[Problem]]:
        """:meth:`claims` for formats that must read small companions (``read``, None on headers alone) to know a shape."""
        return self.claims(qconfig, tensors)

    @abstractmethod
    def row_align(self, q: QuantTensor) -> int:
        """Logical rows one scale row covers; row ranges start at multiples of it."""

    @abstractmethod
    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        """The rows of stored part ``role`` that logical ``rows`` occupy (``rows`` aligned to :meth:`row_align`)."""

    @abstractmethod
    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        """Logical ``rows`` (all for None) as float32, shape ``(r1 - r0, *q.shape[1:])``."""

    def quantize(self, q: QuantTensor, w: torch.Tensor, rows: Rows, like: Parts) -> dict[str, torch.Tensor]:
        """Store float32 logical ``rows`` ``w``: each part's rows by role, fresh scales by the format's rule."""
        raise QuantError(f"{q.label} cannot be requantized here (it needs calibration data); merge with --dtype bf16", key=q.key)

    def requantize(
        self, q: QuantTensor, parts: Parts, rows: Rows, edit: Edit, out: Mapping[str, torch.Tensor], low_rank: LowRank | None = None
    ) -> tuple[float, float]:
        """Merge logical ``rows``: W = dequantize, W' = edit(W), quantize(W') written into ``out`` by role (rows of
        each rewritten part, as :meth:`part_rows` gives them); returns (‖Q(W') − W‖², ‖W' − W‖²) for the survival.
        ``low_rank``: what ``edit`` adds, when it is only low-rank terms (unused here; a fused codec may use it)."""
        base = self.dequantize(q, parts, rows)
        x = edit(base)
        new = self.quantize(q, x, rows, parts)
        for role, dst in out.items():
            dst.copy_(new[role].reshape(dst.shape))
        local = {**{r: t for r, t in parts.items() if r not in new}, **new}
        kept = float(torch.linalg.vector_norm(self.dequantize(q, local, (0, rows[1] - rows[0])).sub_(base))) ** 2
        return kept, float(torch.linalg.vector_norm(x - base)) ** 2

    def streams_low_rank(self, q: QuantTensor) -> bool:
        """Whether ``requantize`` with ``low_rank`` keeps no float32 copy of the rows (its memory does not grow with
        the row block), so a merge may hand it a few large blocks instead of many small ones.  False by default."""
        return False

    def prepare(self) -> None:  # noqa: B027 (a hook with a default, not an abstract method)
        """Called once a merge knows it will read or requantize parameters with this codec: a codec whose fused loops take a while to load
        (an image to link, or numba to start or compile them) starts loading them in the background here.  Does nothing by default."""

    def rewritten(self, q: QuantTensor) -> tuple[str, ...]:
        """Companion roles ``quantize`` returns (rewritten on requantization); the others pass through unchanged."""
        return tuple(q.companions)

    def all_rows(self, q: QuantTensor) -> Rows:
        return (0, q.shape[0])
