"""bitsandbytes 4-bit NF4 linear weights (QLoRA bases, ``quant_method: "bitsandbytes"``), read only.

transformers saves a ``Linear4bit`` ``q_proj`` as (bitsandbytes 0.50 ``functional.py``
``QuantState.as_dict(packed=True)``):

- ``q_proj.weight``: uint8 ``(ceil(n / 2), 1)`` for the ``n = out * in`` elements flattened row
  major; element ``2j`` in the *high* nibble of byte ``j``, ``2j + 1`` in the low one;
- ``q_proj.weight.absmax``: float32 ``(ceil(n / blocksize),)``, one scale per block of
  ``blocksize`` consecutive elements (the last block may be ragged); with double quantization
  (``bnb_4bit_use_double_quant``) it is uint8 codes of a second, 8-bit blockwise quantization:
  ``absmax = nested_quant_map[code] * nested_absmax[k // nested_blocksize] + nested_offset``;
- ``q_proj.weight.quant_map``: float32 ``(16,)``, the NF4 code book;
- ``q_proj.weight.nested_absmax``, ``q_proj.weight.nested_quant_map``: the second level, if any;
- ``q_proj.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` (and ``nested_blocksize``, ``nested_offset``,
  ``nested_dtype`` with double quantization).

``W.flatten()[k] = NF4[code_k] * absmax[k // blocksize]`` in float32, as bitsandbytes' CPU and
default kernels compute it before casting to ``dtype`` (``backends/default/ops.py``
``_dequantize_4bit_compute``).  The kernels use their built-in NF4 table, not the stored
``quant_map``, so the codec requires the stored one to be that table.  NF4 codes come from
quantile rounding of a calibrated model, so nothing here requantizes (and ``fp4`` is refused).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

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

STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
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
    if raw.get("quant_type") != "nf4":
        raise ValueError(f"quant_type {raw.get('quant_type')!r} is not supported (only nf4)")
    shape, blocksize, dtype = raw.get("shape"), raw.get("blocksize"), raw.get("dtype")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        raise ValueError(f"quant state shape {shape!r} is not a list of positive integers")
    if blocksize not in BLOCKSIZES or type(blocksize) is not int:
        raise ValueError(f"quant state blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    if dtype not in DTYPES:
        raise ValueError(f"quant state dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    nested = "nested_blocksize" in raw or "nested_offset" in raw
    if not nested:
        return State(tuple(shape), blocksize, dtype)
    nb, offset = raw.get("nested_blocksize"), raw.get("nested_offset")
    if nb not in BLOCKSIZES or type(nb) is not int:
        raise ValueError(f"quant state nested_blocksize {nb!r} is not one of {BLOCKSIZES}")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise ValueError(f"quant state nested_offset {offset!r} is not a finite number")
    return State(tuple(shape), blocksize, dtype, nb, float(offset))


def blockwise(codes: torch.Tensor, code_book: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``code_book[codes[k]] * absmax[k // blocksize]`` in float32 over flattened ``codes`` (ragged last block)."""
    values = code_book.to(torch.float32)[codes.reshape(-1).to(torch.int64)]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[: values.numel()]
    return values * scale


def absmax_of(
    state: State, absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None
) -> torch.Tensor:
    """The float32 first-level scales: stored as is, or dequantized from the double quantization."""
    if state.nested_blocksize is None:
        return absmax.to(torch.float32)
    if nested_absmax is None or nested_quant_map is None or state.nested_offset is None:
        raise ValueError("double-quantized absmax without nested_absmax and nested_quant_map")
    offset = torch.tensor(state.nested_offset, dtype=torch.float32)
    return blockwise(absmax, nested_quant_map, nested_absmax, state.nested_blocksize) + offset


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
    scales = absmax_of(state, absmax, nested_absmax, nested_quant_map)
    b0 = k0 // state.blocksize
    per_element = scales[b0 : (k1 + state.blocksize - 1) // state.blocksize].repeat_interleave(state.blocksize)
    per_element = per_element[k0 - b0 * state.blocksize :][: k1 - k0]
    values = torch.tensor(NF4, dtype=torch.float32)[codes.to(torch.int64)]
    return (values * per_element).reshape(r1 - r0, *state.shape[1:])
