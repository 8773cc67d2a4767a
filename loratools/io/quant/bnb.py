"""bitsandbytes 4-bit NF4 and FP4 linear weights (QLoRA bases, ``quant_method: "bitsandbytes"``), read only.

transformers saves a ``Linear4bit`` ``q_proj`` as (bitsandbytes 0.50 ``functional.py``
``QuantState.as_dict(packed=True)``):

- ``q_proj.weight``: uint8 ``(ceil(n / 2), 1)`` for the ``n = out * in`` elements flattened row
  major; element ``2j`` in the *high* nibble of byte ``j``, ``2j + 1`` in the low one;
- ``q_proj.weight.absmax``: float32 ``(ceil(n / blocksize),)``, one scale per block of
  ``blocksize`` consecutive elements (the last block may be ragged); with double quantization
  (``bnb_4bit_use_double_quant``) it is uint8 codes of a second, 8-bit blockwise quantization:
  ``absmax = nested_quant_map[code] * nested_absmax[k // nested_blocksize] + nested_offset``;
- ``q_proj.weight.quant_map``: float32 ``(16,)``, the NF4 (or FP4) code book;
- ``q_proj.weight.nested_absmax``, ``q_proj.weight.nested_quant_map``: the second level, if any;
- ``q_proj.weight.quant_state.bitsandbytes__nf4`` (``__fp4``): uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (and ``nested_blocksize``, ``nested_offset``,
  ``nested_dtype`` with double quantization).

``W.flatten()[k] = NF4[code_k] * absmax[k // blocksize]`` in float32, as bitsandbytes' CPU and
default kernels compute it before casting to ``dtype`` (``backends/default/ops.py``
``_dequantize_4bit_compute``; the CPU kernels of ``backends/cpu/ops.py`` agree bit for bit).  FP4
is the same with bitsandbytes' FP4 table (``functional.get_4bit_type("fp4")``).  The kernels use
their built-in tables, not the stored ``quant_map``, so the codec requires the stored one to be
that table; the nested level uses the stored ``nested_quant_map`` (``dequantize_blockwise`` does).
The logical shape is only in the quant-state bytes, so the codec claims through
:meth:`~loratools.io.quant.base.Codec.claims_reading`.  Nothing here requantizes: the merge
writes these bases dequantized (``--dtype bf16``), as GPTQ and AWQ.  bitsandbytes 8-bit
(``SCB``) is a different format and stays refused by the registry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import Problem
from ..tensorfile import TensorInfo
from .base import Codec, Parts, QuantError, QuantTensor, Reader, Rows

NF4 = tuple(
    float.fromhex(h)
    for h in (
        "-0x1.0p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.94654p-2",
        "-0x1.23449ap-2", "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0.0p+0",
        "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
        "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1.0p+0",
    )
)  # fmt: skip
"""The NF4 code book (Dettmers et al. 2023, QLoRA, appendix E), as float32 values bit for bit."""

FP4 = tuple(
    float.fromhex(h)
    for h in (
        "0x0.0p+0", "0x1.555556p-8", "0x1.555556p-1", "0x1.0p+0",
        "0x1.555556p-2", "0x1.0p-1", "0x1.555556p-3", "0x1.0p-2",
        "-0x0.0p+0", "-0x1.555556p-8", "-0x1.555556p-1", "-0x1.0p+0",
        "-0x1.555556p-2", "-0x1.0p-1", "-0x1.555556p-3", "-0x1.0p-2",
    )
)  # fmt: skip
"""bitsandbytes' FP4 code book (0.50 ``functional.get_4bit_type("fp4")``: e2m1 values / 12) as float32, with
code 8 as -0.0 as its native CPU kernel decodes it (the sign bit set; the table's pure-torch fallback has +0.0)."""
CODE_BOOKS = {"nf4": NF4, "fp4": FP4}

STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
STATE_SUFFIXES = {".quant_state.bitsandbytes__nf4": "nf4", ".quant_state.bitsandbytes__fp4": "fp4"}
MAX_STATE_BYTES = 4096
"""A quant-state JSON is ~150 bytes; a larger one is not read."""
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes 0.50 dequantize_4bit's accepted sizes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class State:
    """The scalar part of one weight's quant state (what the JSON bytes say)."""

    shape: tuple[int, ...]
    blocksize: int
    dtype: str
    nested_blocksize: int | None = None
    nested_offset: float | None = None
    quant_type: str = "nf4"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_state(data: bytes) -> State:
    """The quant state from its stored JSON bytes; ValueError naming what is wrong (the file is untrusted)."""
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"quant state is {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"quant state is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError("quant state is not a JSON object")
    quant_type = raw.get("quant_type")
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type {quant_type!r} is not supported (only nf4, fp4)")
    shape, blocksize, dtype = raw.get("shape"), raw.get("blocksize"), raw.get("dtype")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        raise ValueError(f"quant state shape {shape!r} is not a list of positive integers")
    if blocksize not in BLOCKSIZES or type(blocksize) is not int:
        raise ValueError(f"quant state blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    if dtype not in DTYPES:
        raise ValueError(f"quant state dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    nested = "nested_blocksize" in raw or "nested_offset" in raw
    if not nested:
        return State(tuple(shape), blocksize, dtype, quant_type=quant_type)
    nb, offset = raw.get("nested_blocksize"), raw.get("nested_offset")
    if nb not in BLOCKSIZES or type(nb) is not int:
        raise ValueError(f"quant state nested_blocksize {nb!r} is not one of {BLOCKSIZES}")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise ValueError(f"quant state nested_offset {offset!r} is not a finite number")
    return State(tuple(shape), blocksize, dtype, nb, float(offset), quant_type)


def absmax_of(
    state: State,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The float32 first-level scales of ``blocks`` (all for None): stored as is, or dequantized from the double quantization."""
    b0, b1 = blocks if blocks is not None else (0, absmax.numel())
    if state.nested_blocksize is None:
        return absmax.reshape(-1)[b0:b1].to(torch.float32)
    if nested_absmax is None or nested_quant_map is None or state.nested_offset is None:
        raise ValueError("double-quantized absmax without nested_absmax and nested_quant_map")
    offset = torch.tensor(state.nested_offset, dtype=torch.float32)
    codes = absmax.reshape(-1)[b0:b1].to(torch.int64)
    nested = nested_absmax.reshape(-1).to(torch.float32)[torch.arange(b0, b1) // state.nested_blocksize]
    return nested_quant_map.to(torch.float32)[codes] * nested + offset


def dequantize(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    state: State,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logical rows ``rows`` (all for None) of the ``state.shape`` weight as float32.

    Only the bytes and scale blocks those rows touch are read (a row range of a 2-D weight is one
    contiguous run of elements).
    """
    row_size = math.prod(state.shape[1:])
    r0, r1 = rows if rows is not None else (0, state.shape[0])
    k0, k1 = r0 * row_size, r1 * row_size
    packed = weight.reshape(-1)[k0 // 2 : (k1 + 1) // 2].to(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)[k0 % 2 :][: k1 - k0]
    b0, b1 = k0 // state.blocksize, -(-k1 // state.blocksize)
    per_element = absmax_of(state, absmax, nested_absmax, nested_quant_map, (b0, b1)).repeat_interleave(state.blocksize)
    per_element = per_element[k0 - b0 * state.blocksize :][: k1 - k0]
    values = torch.tensor(CODE_BOOKS[state.quant_type], dtype=torch.float32)[codes.to(torch.int64)]
    return (values * per_element).reshape(r1 - r0, *state.shape[1:])


class Bnb4bit(Codec):
    """bitsandbytes ``Linear4bit`` weights: packed ``<module>.weight`` plus its quant state; logical ``<module>.weight``.

    The shape is in the quant-state JSON, so claiming reads it (and the 16-entry code book, to
    check it) through the registry's small-tensor reader; every other part is checked against
    that shape in the headers.  Rows are output features.
    """

    name = "bnb-4bit"
    methods = ("bitsandbytes",)
    requantizable = False

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        return {}, []  # the shape is in data: without a reader nothing is claimed (and the registry refuses the tensors)

    def claims_reading(
        self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo], read: Reader | None
    ) -> tuple[dict[str, QuantTensor], list[Problem]]:
        if read is None:
            return self.claims(qconfig, tensors)
        found: dict[str, QuantTensor] = {}
        problems: list[Problem] = []
        wanted: dict[str, tuple[str, str]] = {}  # weight key -> (state key, quant type its name says)
        for name, info in tensors.items():
            suffix = next((s for s in STATE_SUFFIXES if name.endswith(s)), None)
            if suffix is None:
                continue
            key = name.removesuffix(suffix)
            if info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > MAX_STATE_BYTES:
                size = f"{info.dtype} {list(info.shape)} ({info.nbytes} bytes; expected U8 of at most {MAX_STATE_BYTES})"
                why = f"quant state {name} is {size}"
                problems.append(_malformed(key, why))
                continue
            book = tensors.get(f"{key}.quant_map")
            if book is None or book.dtype != "F32" or book.shape != (16,):
                problems.append(_malformed(key, f"{key}.quant_map must be F32 [16] beside its quant state"))
                continue
            wanted[key] = (name, STATE_SUFFIXES[suffix])
        keys = [k for key, (state, _) in wanted.items() for k in (state, f"{key}.quant_map")]
        stored = read(keys) if keys else {}
        for key, (state_key, named) in wanted.items():
            q, why = _claim(key, bytes(stored[state_key].numpy()), named, stored[f"{key}.quant_map"], tensors)
            if q is not None:
                found[key] = q
            else:
                problems.append(_malformed(key, why))
        return found, problems

    def row_align(self, q: QuantTensor) -> int:
        return 1

    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        if role != q.primary:
            return 0, int(q.params["rows"][role])
        row_size = math.prod(q.shape[1:])
        return rows[0] * row_size // 2, (rows[1] * row_size + 1) // 2  # two codes a byte, row major

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        p = q.params
        state = State(q.shape, p["blocksize"], p["dtype"], p["nested_blocksize"], p["nested_offset"], p["quant_type"])
        try:
            return dequantize(
                parts["weight"],
                parts["absmax"],
                state,
                nested_absmax=parts.get("nested_absmax"),
                nested_quant_map=parts.get("nested_quant_map"),
                rows=rows,
            )
        except ValueError as e:
            raise QuantError(str(e), key=q.key) from None


def _malformed(key: str, why: str) -> Problem:
    return Problem("base-quant-malformed", key, f"bitsandbytes 4-bit weight {key}: {why}")


def _claim(
    key: str, state_bytes: bytes, named: str, book: torch.Tensor, tensors: Mapping[str, TensorInfo]
) -> tuple[QuantTensor | None, str]:
    """The QuantTensor of weight ``key`` from its quant-state bytes and the parts' headers, or None and why they do not fit."""
    try:
        state = parse_state(state_bytes)
    except ValueError as e:
        return None, str(e)
    if state.quant_type != named:
        return None, f"quant state says quant_type {state.quant_type!r} but is stored as bitsandbytes__{named}"
    if not torch.equal(book, torch.tensor(CODE_BOOKS[state.quant_type], dtype=torch.float32)):
        return None, f"quant_map is not bitsandbytes' {state.quant_type.upper()} table (its kernels ignore a stored one)"
    n, blocks = state.numel, -(-state.numel // state.blocksize)
    want: dict[str, tuple[str, tuple[int, ...]]] = {"weight": ("U8", ((n + 1) // 2, 1))}
    if state.nested_blocksize is None:
        want["absmax"] = ("F32", (blocks,))
    else:
        want["absmax"] = ("U8", (blocks,))
        want["nested_absmax"] = ("F32", (-(-blocks // state.nested_blocksize),))
        want["nested_quant_map"] = ("F32", (256,))
    parts = {"weight": key, "quant_map": f"{key}.quant_map", "quant_state": f"{key}.quant_state.bitsandbytes__{named}"}
    for role, (dtype, shape) in want.items():
        stored_key = key if role == "weight" else f"{key}.{role}"
        info = tensors.get(stored_key)
        if info is None:
            return None, f"{stored_key} is missing"
        if info.dtype != dtype or info.shape != shape:
            return None, (
                f"{stored_key} is {info.dtype} {list(info.shape)}, but a {list(state.shape)} weight in blocks of "
                f"{state.blocksize} needs {dtype} {list(shape)}"
            )
        parts[role] = stored_key
    nested = ", double-quantized scales" if state.nested_blocksize is not None else ""
    label = f"bitsandbytes {state.quant_type.upper()}, block size {state.blocksize}{nested}"
    params = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": state.dtype,
        "nested_blocksize": state.nested_blocksize,
        "nested_offset": state.nested_offset,
        "rows": {role: tensors[k].shape[0] for role, k in parts.items()},
    }
    return QuantTensor(key, "bnb-4bit", state.shape, parts, "weight", label, params), ""


CODEC = Bnb4bit()
