"""Which codec stores which base tensor: every codec's claims over one checkpoint, and what none claims.

``scan(qconfig, tensors)`` is the one place that decides whether a base tensor is quantized.  The
planner asks it once per checkpoint: a claimed parameter is merged through its codec; a tensor that
looks quantized (a quantized dtype, or a scale/zero-point companion) that no codec claims is
refused by name, never treated as a float weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import Problem
from ..checkpoint import Checkpoint
from ..tensorfile import TensorInfo, load_tensors
from . import awq, bnb, fp8_block, fp8_tensor, gptq, mxfp4
from .base import COMPANION_SUFFIXES, QUANT_DTYPES, SMALL_BYTES, Codec, QuantError, QuantTensor, Reader

CODECS: tuple[Codec, ...] = (
    fp8_block.CODEC,
    fp8_tensor.CODEC,
    mxfp4.CODEC,
    gptq.CODEC,
    awq.CODEC,
    bnb.CODEC,
)
"""Every codec, in the order they are asked (one line per codec module)."""

UNSUPPORTED = "base-quant-unsupported"
MALFORMED = "base-quant-malformed"


@dataclass(frozen=True)
class QuantMap:
    """A checkpoint's quantized parameters (by logical key), their stored keys, and what no codec handles."""

    params: dict[str, QuantTensor] = field(default_factory=dict)  # logical key -> QuantTensor
    stored: dict[str, QuantTensor] = field(default_factory=dict)  # every stored key of a claimed parameter -> it
    unhandled: dict[str, str] = field(default_factory=dict)  # logical key -> what it looks like ("F8_E4M3 with weight_scale")
    problems: list[Problem] = field(default_factory=list)  # malformed claims
    method: str | None = None  # quantization_config.quant_method

    def __bool__(self) -> bool:
        return bool(self.params or self.unhandled or self.problems)

    def is_companion(self, key: str) -> bool:
        """Whether stored ``key`` is a non-data part of a quantized parameter (never an unmatched base tensor)."""
        q = self.stored.get(key)
        if q is not None:
            return key != q.primary_key
        return key.endswith(COMPANION_SUFFIXES)

    def logical(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Header entries for parameters stored under other names (``qweight``, ``_blocks``): their logical
        shape (unknown, empty, for unhandled ones), so adapter modules find them and get this map's verdict."""
        found = {
            k: TensorInfo(k, "F32", q.shape, 0, 0)
            for k, q in self.params.items()
            if k not in tensors or tensors[k].shape != q.shape  # bnb 4-bit: packed bytes stored under the logical key
        }
        return {**{k: TensorInfo(k, "?", (), 0, 0) for k in self.unhandled if k not in tensors}, **found}

    def refusal(self, key: str) -> Problem | None:
        """The problem for merging into logical base key ``key`` when no codec handles it, else None."""
        what = self.unhandled.get(key)
        if what is None:
            return None
        for p in self.problems:
            if p.where == key:
                return p
        method = f", quant_method {self.method!r}" if self.method else ""
        if what.startswith("stored as"):  # a dtype alone: the float-only rule's own code, as before codecs existed
            message = (
                f"base tensor {key} is {what} with no companion scales a codec reads{method}; ΔW can only be added to "
                "F64, F32, F16, BF16 weights or to quantized ones a codec dequantizes"
            )
            return Problem("base-dtype-unsupported", key, message)
        return Problem(
            UNSUPPORTED,
            key,
            f"base tensor {key} is quantized ({what}{method}) in a format loratools cannot dequantize; "
            "ΔW is never added to stored quantized values",
        )


def codec(name: str) -> Codec:
    """The codec named ``name`` (as recorded in a QuantTensor)."""
    for c in CODECS:
        if c.name == name:
            return c
    raise KeyError(name)


def qconfig_of(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (also nested under ``text_config``), or None."""
    if not isinstance(config, Mapping):
        return None
    for holder in (config, config.get("text_config")):
        if isinstance(holder, Mapping) and isinstance(holder.get("quantization_config"), Mapping):
            return dict(holder["quantization_config"])
    return None


def scan(config: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], read: Reader | None = None) -> QuantMap:
    """Every codec's claims over ``tensors`` and the quantized-looking tensors none claims.

    ``config`` is the checkpoint's ``config.json`` (or None).  A ``quant_method`` selects the codecs
    that list it; with none (or one no codec lists) every codec looks at the tensors.  ``read``
    (:func:`reader` of the checkpoint) lets codecs whose shapes live in data read small companions;
    without it they claim nothing and their tensors are refused.
    """
    qconfig = qconfig_of(config)
    method = qconfig.get("quant_method") if qconfig else None
    method = method if isinstance(method, str) else None
    asked = [c for c in CODECS if method in c.methods] or list(CODECS)
    params: dict[str, QuantTensor] = {}
    problems: list[Problem] = []
    for c in asked:
        found, bad = c.claims_reading(qconfig, tensors, read)
        problems += bad
        for key, q in found.items():
            params.setdefault(key, q)
    stored = {k: q for q in params.values() for k in q.stored_keys}
    unhandled: dict[str, str] = {}
    for name, info in tensors.items():
        if name in stored:
            continue
        logical, evidence = _evidence(name, info)
        if evidence and logical not in params:
            unhandled.setdefault(logical, evidence)
    for p in problems:
        unhandled.setdefault(p.where, "malformed")
    return QuantMap(params, stored, unhandled, problems, method)


def _evidence(name: str, info: TensorInfo) -> tuple[str, str | None]:
    """The logical key stored ``name`` belongs to, and what marks it as quantized (None: nothing)."""
    for suffix in COMPANION_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            logical = stem if suffix.startswith("_") else stem + ".weight"  # gpt-oss names the parameter itself
            return logical, f"has {suffix.lstrip('._')}"
    if info.dtype in QUANT_DTYPES:
        return name, f"stored as {info.dtype}"
    return name, None


def read_stored(checkpoint: Checkpoint, keys: list[str]) -> dict[str, torch.Tensor]:
    """Stored tensors ``keys`` of ``checkpoint`` by key, read through safetensors shard by shard (scales, small weights)."""
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(checkpoint.shard_of(key).name, []).append(key)
    return {k: t for shard, names in by_shard.items() for k, t in load_tensors(checkpoint.headers[shard], names).items()}


def reader(checkpoint: Checkpoint) -> Reader:
    """A :data:`~loratools.io.quant.base.Reader` over ``checkpoint``: small tensors only, checked in the header before reading."""

    def read(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        for key in keys:
            info = checkpoint.tensors[key]
            if info.nbytes > SMALL_BYTES:
                raise QuantError(f"{info.nbytes} bytes, more than the {SMALL_BYTES} a codec reads while claiming", key=key)
        return read_stored(checkpoint, list(keys))

    return read


def dequantized(checkpoint: Checkpoint, q: QuantTensor) -> torch.Tensor:
    """Quantized parameter ``q`` of ``checkpoint`` read whole and dequantized to float32 by its codec."""
    stored = read_stored(checkpoint, list(q.parts.values()))
    return codec(q.codec).dequantize(q, {role: stored[key] for role, key in q.parts.items()})


def logical_tensors(checkpoint: Checkpoint, quant: QuantMap) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as a float checkpoint would hold them: claimed parameters under their
    logical keys (float32, their logical shape), companions left out."""
    kept = {k: t for k, t in checkpoint.tensors.items() if k not in quant.stored and not quant.is_companion(k)}
    return {**kept, **{k: TensorInfo(k, "F32", q.shape, 0, 0) for k, q in quant.params.items()}}
