"""FP8 e4m3 weights with block scales: DeepSeek-V3/R1, Qwen3-FP8, transformers' ``fp8`` quant_method.

A weight ``W`` (N, K) is stored as ``q_proj.weight`` (float8_e4m3fn, N x K) and
``q_proj.weight_scale_inv`` (ceil(N/bm) x ceil(K/bn)), ``[bm, bn] = quantization_config.weight_block_size``
(128 x 128 in every released checkpoint); edge blocks are ragged when N or K is not a multiple.
``W[i, j] = float(q[i, j]) * scale_inv[i // bm, j // bn]`` in float32, as transformers 5.24
``integrations/finegrained_fp8.py`` ``_dequantize_fp8_weight`` computes it.  Fused experts (E, N, K)
carry one grid per expert, (E, ceil(N/bm), ceil(K/bn)).  A scale of one element is a per-tensor scale.

Requantization is transformers' ``Fp8Quantize._quantize_one`` (same file): per block,
``a = amax|W|``, ``s = 448 / a`` (1 for an all-zero block), stored ``scale_inv = 1 / s`` in float32,
``q = clamp(W · s, -448, 448)`` cast to e4m3 (round to nearest even); with ``scale_fmt: "ue8m0"``
(or scales stored as F8_E8M0) ``scale_inv`` is first rounded up to a power of two and ``s = 1 / scale_inv``.
Scales stored in BF16/F16 are rounded to that dtype the same way before ``s`` is taken, so the
stored scale is exactly the one the weight was divided by.  Ragged edge blocks take the amax of
the elements they hold (transformers only quantizes whole blocks; zero padding gives the same result).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...errors import Problem
from ...fused import e4m3 as fused
from ...scratch import buffer as scratch
from ..tensorfile import TensorInfo
from .base import Codec, Edit, LowRank, Parts, QuantTensor, Rows
from .e4m3 import FP8, FP8_MAX, decode

SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
_SCALE = ".weight_scale_inv"


class Fp8Block(Codec):
    name = "fp8-block"
    methods = ("fp8", "fbgemm_fp8")
    requantizable = True

    def claims(self, qconfig: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, QuantTensor], list[Problem]]:
        block = _config_block(qconfig)
        ue8m0 = bool(qconfig) and qconfig.get("scale_fmt") == "ue8m0"  # type: ignore[union-attr]
        found: dict[str, QuantTensor] = {}
        problems: list[Problem] = []
        for name, scale in tensors.items():
            if not name.endswith(_SCALE):
                continue
            key = name.removesuffix("_scale_inv")
            q, why = _claim(key, tensors.get(key), scale, block, ue8m0)
            if q is not None:
                found[key] = q
            else:
                problems.append(Problem("base-quant-malformed", key, f"FP8 block-scaled weight {key}: {why}"))
        return found, problems

    def streams_low_rank(self, q: QuantTensor) -> bool:
        """2-D weights with F32 scales: the merged rows live in a strip of blocks that stays in cache (:meth:`requantize`)."""
        return len(q.shape) == 2 and _f32_scales(q)

    def prepare(self) -> None:
        """Loads the compiled loops on a background thread, while the merge reads the adapter and copies what it keeps:
        linking their image takes about 0.1 s; where none is cached yet, numba compiles them and builds it (once)."""
        fused.LOOPS.start()

    def row_align(self, q: QuantTensor) -> int:
        return 1 if len(q.shape) == 3 else int(q.params["block"][0])

    def part_rows(self, q: QuantTensor, role: str, rows: Rows) -> Rows:
        if role == "weight" or len(q.shape) == 3:
            return rows
        bm = int(q.params["block"][0])
        return rows[0] // bm, -(-rows[1] // bm)

    def dequantize(self, q: QuantTensor, parts: Parts, rows: Rows | None = None) -> torch.Tensor:
        r = rows or self.all_rows(q)
        s = r if len(q.shape) == 3 else self.part_rows(q, "scale", r)
        stored = parts["weight"][r[0] : r[1]]
        scale = parts["weight_scale_inv"][s[0] : s[1]].to(torch.float32)
        bm, bn = q.params["block"]
        if len(q.shape) == 2 and stored.device.type == "cpu":  # one fused pass, the same values (loratools.fused.e4m3)
            out = torch.empty(stored.shape)
            fused.decode(_bytes(stored), scale.reshape(_grid(stored.shape, (bm, bn))).numpy(), bm, bn, out.numpy())
            return out
        weight = decode(stored)
        if q.params["per_tensor"]:
            return weight.mul_(scale.reshape(()))
        n, k = weight.shape[-2:]
        if n % bm == 0 and k % bn == 0:  # whole blocks: one broadcast multiply, the same product per element
            tiles = weight.view(*weight.shape[:-2], n // bm, bm, k // bn, bn)
            return tiles.mul_(scale[..., :, None, :, None]).view(weight.shape)
        full, rem = divmod(k, bn)
        # transformers' _dequantize_fp8_weight: the scale expanded over rows only, broadcast over columns
        scale = scale.repeat_interleave(bm, dim=-2)[..., :n, :]
        weight[..., : full * bn].unflatten(-1, (full, bn)).mul_(scale[..., :full, None])
        if rem:
            weight[..., full * bn :].mul_(scale[..., full:])
        return weight

    def quantize(self, q: QuantTensor, w: torch.Tensor, rows: Rows, like: Parts) -> dict[str, torch.Tensor]:
        bm, bn = q.params["block"]
        n, k = w.shape[-2:]
        pad_n, pad_k = -n % bm, -k % bn
        x = torch.nn.functional.pad(w, (0, pad_k, 0, pad_n)) if pad_n or pad_k else w
        tiles = x.reshape(*x.shape[:-2], x.shape[-2] // bm, bm, x.shape[-1] // bn, bn)
        amax = tiles.abs().amax(dim=(-3, -1))
        inv, scale = _scales(amax, like["weight_scale_inv"].dtype, bool(q.params["ue8m0"]))
        scaled = (tiles * scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        weight = scaled.to(FP8).reshape(x.shape)[..., :n, :k]
        if q.params["per_tensor"]:
            inv = inv.reshape(like["weight_scale_inv"].shape)
        return {"weight": weight.contiguous() if pad_n or pad_k else weight, "weight_scale_inv": inv}

    def requantize(
        self, q: QuantTensor, parts: Parts, rows: Rows, edit: Edit, out: Mapping[str, torch.Tensor], low_rank: LowRank | None = None
    ) -> tuple[float, float]:
        """:meth:`dequantize`, the edit, :meth:`quantize` and the survival norms, fused on the CPU (2-D weights).

        Compiled passes (:mod:`loratools.fused.e4m3`).  Given ``low_rank``, W' is formed by its rule
        (:meth:`LowRank.apply`) inside the decoding pass, the products included; with F32 scales the
        fresh scales and the requantization follow a strip of blocks at a time, while the merged strip
        is still in cache, so no float32 row block is ever written out.  Otherwise: the decode with the
        block maxima (``edit`` between them), the fresh scales, then the requantization with both norms
        (decoding the base again from its bytes, cheaper than reading a float copy).  Each float32 value
        is the same product or sum of the same operands as in the unfused methods, so every byte and
        scale written is identical (tests/io/quant/test_fp8_block.py compares them); the norms are the
        same sums taken in another order.
        """
        low_rank = low_rank if low_rank is not None and low_rank.terms else None
        if len(q.shape) != 2 or parts["weight"].device.type != "cpu":  # the unfused methods, by the same rule
            return super().requantize(q, parts, rows, low_rank.apply if low_rank is not None else edit, out)
        stored = parts["weight_scale_inv"]
        bm, bn = q.params["block"]
        r0, r1 = rows
        n, k = r1 - r0, q.shape[1]
        s0, s1 = self.part_rows(q, "weight_scale_inv", rows)
        grid = _grid((n, k), (bm, bn))
        old_scale = stored[s0:s1].to(torch.float32).reshape(grid).numpy()
        weight = _bytes(parts["weight"][r0:r1])
        fresh_f32 = _f32_scales(q)
        if low_rank is not None and fresh_f32:
            inv = torch.empty(grid)
            norms = fused.merge_requantize(weight, old_scale, low_rank.packed(), bm, bn, _bytes(out["weight"]), inv.numpy())
            out["weight_scale_inv"].copy_(inv.reshape(out["weight_scale_inv"].shape))
            return norms
        amax = torch.zeros(grid)
        if low_rank is not None:
            x = scratch("fp8-merged", n * k).view(n, k)
            fused.merge(weight, old_scale, low_rank.packed(), bm, bn, x.numpy(), amax.numpy().view(np.int32))
        else:
            base = scratch("fp8-base", n * k).view(n, k)
            fused.decode(weight, old_scale, bm, bn, base.numpy())
            x = edit(base).contiguous()
            fused.block_amax(x.numpy().view(np.int32), bm, bn, amax.numpy().view(np.int32))
        if fresh_f32:
            scale, inv = torch.empty(grid), torch.empty(grid)
            fused.scales(amax.numpy(), scale.numpy(), inv.numpy())
            back = inv
        else:
            inv, scale = _scales(amax, stored.dtype, bool(q.params["ue8m0"]))
            back = inv.to(torch.float32).reshape(grid)
        out["weight_scale_inv"].copy_(inv.reshape(out["weight_scale_inv"].shape))
        return fused.requantize(x.numpy(), weight, old_scale, scale.reshape(grid).numpy(), back.numpy(), bm, bn, _bytes(out["weight"]))


def _f32_scales(q: QuantTensor) -> bool:
    """Scales stored as F32 and taken by Fp8Quantize's plain rule (not rounded to a power of two): the compiled scales."""
    return q.params["scale_dtype"] == "F32" and not q.params["ue8m0"]


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of rows ``shape`` (n, k) in ``block`` (bm, bn) blocks, ragged edges included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A float8 tensor's bytes as a uint8 array (no copy when contiguous)."""
    return t.contiguous().view(torch.uint8).numpy()


def _scales(amax: torch.Tensor, stored: torch.dtype, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale_inv as stored, the float32 scale the weight is multiplied by) from block amax, by Fp8Quantize's rule."""
    positive = amax > 0
    scale = FP8_MAX / torch.where(positive, amax, torch.ones_like(amax))
    scale = torch.where(positive, scale, torch.ones_like(scale))
    inv = (1.0 / scale).to(torch.float32)
    if ue8m0 or stored == torch.float8_e8m0fnu:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        stored_inv = inv.to(torch.float8_e8m0fnu if stored == torch.float8_e8m0fnu else stored)
        return stored_inv, 1.0 / stored_inv.to(torch.float32)
    if stored != torch.float32:
        stored_inv = inv.to(stored)
        return stored_inv, 1.0 / stored_inv.to(torch.float32)
    return inv, scale


def _config_block(qconfig: Mapping[str, Any] | None) -> tuple[int, int] | None:
    raw = qconfig.get("weight_block_size") if qconfig else None
    if isinstance(raw, list | tuple) and len(raw) == 2 and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in raw):
        return int(raw[0]), int(raw[1])
    return None


def _claim(
    key: str, weight: TensorInfo | None, scale: TensorInfo, block: tuple[int, int] | None, ue8m0: bool
) -> tuple[QuantTensor | None, str]:
    """The QuantTensor of ``key`` with its scale ``scale``, or None and why it is malformed."""
    if weight is None:
        return None, f"{scale.name} has no {key} beside it"
    if weight.dtype != "F8_E4M3":
        return None, f"stored as {weight.dtype} beside {scale.name} (expected F8_E4M3)"
    if scale.dtype not in SCALE_DTYPES:
        return None, f"{scale.name} is stored as {scale.dtype} (expected one of {', '.join(SCALE_DTYPES)})"
    if len(weight.shape) not in (2, 3):
        return None, f"has shape {list(weight.shape)}; block scales need a 2-D weight or 3-D fused experts"
    n, k = weight.shape[-2:]
    parts = {"weight": key, "weight_scale_inv": scale.name}
    params: dict[str, Any] = {"ue8m0": ue8m0, "scale_dtype": scale.dtype}
    if math.prod(scale.shape) == 1 and len(weight.shape) == 2 and (block is None or (n, k) != block):
        label = f"FP8 e4m3, one per-tensor scale ({scale.dtype} weight_scale_inv)"
        params |= {"block": (n, k), "per_tensor": True}
        return QuantTensor(key, "fp8-block", weight.shape, parts, "weight", label, params), ""
    grid = tuple(scale.shape[-2:]) if len(scale.shape) >= 2 else None
    if block is None and grid is not None and grid[0] and grid[1] and n % grid[0] == 0 and k % grid[1] == 0:
        block = (n // grid[0], k // grid[1])
    if block is None:
        return None, f"{scale.name} {list(scale.shape)} does not divide {list(weight.shape)} and config.json gives no weight_block_size"
    want = (*weight.shape[:-2], -(-n // block[0]), -(-k // block[1]))
    if tuple(scale.shape) != want:
        return None, f"{scale.name} is {list(scale.shape)} but {list(weight.shape)} in {block[0]}x{block[1]} blocks needs {list(want)}"
    label = f"FP8 e4m3, {block[0]}x{block[1]} block scales ({scale.dtype} weight_scale_inv)"
    params |= {"block": block, "per_tensor": False}
    return QuantTensor(key, "fp8-block", weight.shape, parts, "weight", label, params), ""


CODEC = Fp8Block()
