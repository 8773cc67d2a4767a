"""Fused projections: one original module (Flux ``img_attn.qkv``, SD3 ``attn.qkv``) as several diffusers modules, and back.

Original checkpoints (BFL's Flux.1, Stability's SD3 MMDiT) compute q, k and v (and in Flux's single
blocks the MLP input too) with one linear layer whose output rows are the concatenation; diffusers'
models hold one linear layer per projection.  A LoRA on the fused layer is ΔW = s·B·A with B of
shape (Σ rowsᵢ) x r, so each part is ΔWᵢ = s·Bᵢ·A with Bᵢ its rows of B and A shared: rank r and
alpha stay, and each ΔWᵢ is exactly those rows of ΔW (:func:`split`).

:func:`fuse` goes back.  Parts that share one A and one scale become one module with their Bs
concatenated (bitwise the original factors; a missing part is zero rows).  Otherwise A is the parts' As stacked (rank Σ rᵢ) and B
block-diagonal, so row block i of B·A is Bᵢ·Aᵢ; missing parts get zero rows; differing scales are
folded into their Bs (exact up to one float32 rounding of each Bᵢ entry).

The rules name how a table row splits: ``one`` (no split), ``equal`` (rows in n equal parts),
``qkv_mlp`` (Flux single blocks: three parts of ``in`` rows each, then the MLP rows) and ``adaln``
(no split, but an output of 2·in rows is (shift, scale) in the original and (scale, shift) in
diffusers, so the two halves of B swap: diffusers 0.42 ``loaders/single_file_utils.swap_scale_shift``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import spec
from ..adapter import Adapter, LoraModule, RawAdapter, raw_from_modules
from ..errors import FormatError
from ..io.checkpoint import open_checkpoint
from ..io.tensorfile import Header, load_tensors
from . import kohya

# Flux.1's MLP is mlp_ratio = 4 times the hidden size (diffusers 0.42 FluxTransformer2DModel,
# BFL flux/model.py): the rows of a single block's linear1 beyond q, k and v when no proj_mlp part says.
MLP_RATIO = 4


@dataclass(frozen=True)
class Row:
    """One table row: the original module ``source`` (``{i}`` stands for a block number), how it splits, and its parts."""

    source: str
    rule: str
    targets: tuple[str, ...]


class Table:
    """A layout table between original module paths and diffusers module paths, matched both ways."""

    def __init__(self, rows: Iterable[Row]):
        self.rows = tuple(rows)
        self._forward = [(re.compile(_pattern(r.source)), r) for r in self.rows]
        self._backward = [(re.compile(_pattern(t)), r, j) for r in self.rows for j, t in enumerate(r.targets)]
        self._flat = [(re.compile(_pattern("lora_unet_" + r.source.replace(".", "_"))), r) for r in self.rows]

    def forward(self, source: str, *, flat: bool = False) -> tuple[Row, list[str]] | None:
        """The row an original path (``flat``: its kohya name, ``lora_unet_`` + dots flattened) matches, and its target paths."""
        for pattern, row in self._flat if flat else self._forward:
            match = pattern.fullmatch(source)
            if match:
                return row, [t.replace("{i}", match["i"]) if match.groupdict().get("i") else t for t in row.targets]
        return None

    def backward(self, target: str) -> tuple[Row, str, int] | None:
        """The row a diffusers path is a part of, the original path, and the part's position."""
        for pattern, row, j in self._backward:
            match = pattern.fullmatch(target)
            if match:
                return row, row.source.replace("{i}", match["i"]) if match.groupdict().get("i") else row.source, j
        return None


def _pattern(template: str) -> str:
    return re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")


def row_sizes(rule: str, n: int, rows: int, inp: int) -> list[int] | None:
    """Output rows of each of ``n`` parts of a fused module of ``rows`` x ``inp``; None if they cannot add up."""
    if rule == "equal":
        return [rows // n] * n if rows % n == 0 else None
    if rule == "qkv_mlp":
        return [inp, inp, inp, rows - 3 * inp] if rows > 3 * inp else None
    return [rows]


def _swap(B: torch.Tensor, inp: int, rule: str) -> torch.Tensor:
    """B with the halves of its rows swapped where ``rule`` is ``adaln`` and it has 2·``inp`` rows (its own inverse)."""
    if rule != "adaln" or B.shape[0] != 2 * inp:
        return B
    return torch.cat([B[inp:], B[:inp]])


def split(module: LoraModule, row: Row, *, name: str) -> list[LoraModule]:
    """The parts of fused ``module`` (table ``row``): each the same A and alpha with its rows of B."""
    if row.rule == "one":
        return [module]
    if module.magnitude is not None or module.bias is not None or module.kind != "linear":
        raise FormatError(f"{name} is a fused {row.source} module with DoRA, lora_B.bias or conv factors, which are not split", key=name)
    inp = int(module.A.shape[1])
    sizes = row_sizes(row.rule, len(row.targets), int(module.B.shape[0]), inp)
    if sizes is None:
        raise FormatError(
            f"lora_up/lora_B of {list(module.B.shape)} does not split into {', '.join(row.targets)}", key=name, code="bad-shape"
        )
    B = _swap(module.B, inp, row.rule)
    return [replace(module, B=part.contiguous()) for part in torch.split(B, sizes)]


def fuse(parts: Sequence[LoraModule | None], row: Row, *, name: str) -> LoraModule:
    """One module on the fused original layer from its diffusers ``parts`` (None where a part has no LoRA)."""
    present = [p for p in parts if p is not None]
    if row.rule == "one":
        return present[0]
    for p in present:
        if p.magnitude is not None or p.bias is not None or p.kind != "linear":
            raise FormatError(f"a part of fused module {name} has DoRA, lora_B.bias or conv factors, which are not fused", key=name)
    inp = int(present[0].A.shape[1])
    if row.rule == "qkv_mlp":
        mlp = parts[3].B.shape[0] if parts[3] is not None else MLP_RATIO * inp
        sizes = [inp, inp, inp, int(mlp)]
    else:
        sizes = [int(present[0].B.shape[0])] * len(parts)
    first = present[0]
    if all(
        p.A.shape == first.A.shape and torch.equal(p.A, first.A) and p.alpha == first.alpha and p.rslora == first.rslora for p in present
    ):
        rows = [q.B if q is not None else first.B.new_zeros(size, first.rank) for q, size in zip(parts, sizes, strict=True)]
        return replace(first, B=_swap(torch.cat(rows), inp, row.rule).contiguous())
    scales = {p.scale for p in present}
    common = scales.pop() if len(scales) == 1 else 1.0
    rank = sum(p.rank for p in present)
    dtype = first.B.dtype
    B = torch.zeros(sum(sizes), rank, dtype=dtype)
    r0, o0 = 0, 0
    for part, size in zip(parts, sizes, strict=True):
        if part is not None:
            block = part.B if part.scale == common else (part.B.float() * (part.scale / common)).to(dtype)
            B[o0 : o0 + size, r0 : r0 + part.rank] = block
            r0 += part.rank
        o0 += size
    A = torch.cat([p.A.to(dtype) for p in present])
    return LoraModule(A, _swap(B, inp, row.rule).contiguous(), spec.alpha_for(common, rank), False, "linear")


def split_all(fused: Mapping[str, LoraModule], table: Table, *, flat: bool, prefix: str) -> tuple[dict[str, LoraModule], list[str]]:
    """Every fused module as its diffusers parts (named ``prefix`` + target), and the names no table row matches."""
    out: dict[str, LoraModule] = {}
    unmapped = []
    for name, module in fused.items():
        hit = table.forward(name, flat=flat)
        if hit is None:
            unmapped.append(name)
            continue
        row, targets = hit
        for target, part in zip(targets, split(module, row, name=name), strict=True):
            out[prefix + target] = part
    return out, unmapped


def fuse_all(modules: Mapping[str, LoraModule], table: Table, *, prefix: str) -> tuple[dict[str, LoraModule], list[str]]:
    """``modules`` (diffusers paths behind ``prefix``) on the original layers, and the names no table row matches."""
    groups: dict[str, tuple[Row, dict[int, LoraModule]]] = {}
    unmapped = []
    for name, module in modules.items():
        hit = table.backward(name.removeprefix(prefix)) if name.startswith(prefix) else None
        if hit is None:
            unmapped.append(name)
            continue
        row, source, j = hit
        groups.setdefault(source, (row, {}))[1][j] = module
    out = {}
    for source, (row, found) in groups.items():
        out[prefix + source] = fuse([found.get(j) for j in range(len(row.targets))], row, name=source)
    return out, unmapped


def unmapped_error(names: Sequence[str], what: str, **where: object) -> FormatError:
    """One error naming every module a layout table could not map."""
    listed = ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")
    return FormatError(f"{len(names)} module(s) have no {what} counterpart: {listed}", code="layout-unmapped", **where)  # type: ignore[arg-type]


# Tensor suffixes of the original layouts, as kohya's roles (so kohya's module rules read them all).
ROLES = {
    "lora_A.weight": kohya.DOWN,
    "lora_down.weight": kohya.DOWN,
    "down.weight": kohya.DOWN,
    "lora_B.weight": kohya.UP,
    "lora_up.weight": kohya.UP,
    "up.weight": kohya.UP,
    "alpha": kohya.ALPHA,
    "dora_scale": kohya.DORA,
}
ORIGINAL_PREFIX = r"(?:model\.diffusion_model\.|diffusion_model\.)?"  # as single-file checkpoints prefix the original names
ORIGINAL_KEY = re.compile(
    ORIGINAL_PREFIX + r"(?P<module>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|dora_scale)"
)
KOHYA_KEY = re.compile(r"(?P<module>lora_(?:unet|te\d?)_\w+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale)")


@dataclass(frozen=True)
class Layout:
    """One on-disk key layout of an architecture: how its keys read (``pattern`` with ``module`` and
    ``role`` groups), which table maps its modules, whether names are kohya-flattened, and the format
    written back (``kohya`` or ``diffusers``)."""

    name: str
    marker: re.Pattern[str]
    pattern: re.Pattern[str]
    table: Table
    flat: bool
    source: str


@dataclass(frozen=True)
class Architecture:
    """A model family with fused original projections: its layouts, its original table, and how to tell an original-layout base."""

    name: str
    layouts: tuple[Layout, ...]
    original: Table
    base_marker: str  # a substring only that family's original checkpoint keys hold
    signature: str | None = None  # a module prefix that only this family's diffusers model has
    prefix: str = "transformer."

    def detect(self, names: Iterable[str]) -> Layout | None:
        """The layout tensor ``names`` are in, if one of this family's: its marker, and at least one module its
        table maps (HunyuanVideo's ``double_blocks.0.img_attn_qkv`` is no Flux module, and reads as before)."""
        names = list(names)
        for lay in self.layouts:
            if any(lay.marker.match(n) for n in names) and any(_maps(lay, n) for n in names):
                return lay
        return None

    def read(self, header: Header, layout: Layout, *, base: str | Path | None) -> RawAdapter:
        """The file as diffusers-named modules (``transformer.<module>``), fused projections split; onto an
        original-layout ``base``, named by the original paths instead (fused again, bitwise the file's factors)."""
        modules = read_modules(header, layout.pattern)
        passthrough = {n: m for n, m in modules.items() if spec.KOHYA_NAME.match(n) and not n.startswith("lora_unet_")}
        ours = {n: m for n, m in modules.items() if n not in passthrough}
        split_modules, unmapped = split_all(ours, layout.table, flat=layout.flat, prefix=self.prefix)
        if unmapped:
            raise unmapped_error(unmapped, f"{self.name} ({layout.name} layout)", path=header.path)
        if base is not None and _original_base(base, self.base_marker):
            fused, _ = fuse_all(split_modules, self.original, prefix=self.prefix)
            split_modules = {n.removeprefix(self.prefix): m for n, m in fused.items()}
        metadata = {**header.metadata, spec.META_ARCH: self.name}
        if layout.source == "kohya":
            raw = kohya.from_modules(replace(header, metadata=metadata), {**split_modules, **passthrough}, base=base)
            return raw
        return raw_from_modules(split_modules, header, {**metadata, spec.META_SOURCE: layout.source})

    def owns(self, adapter: Adapter) -> bool:
        """Whether ``adapter`` was read as this family's, or has a module only its diffusers model has."""
        if spec.META_ARCH in adapter.metadata:
            return adapter.metadata[spec.META_ARCH] == self.name
        return self.signature is not None and any(n.startswith(self.signature) for n in adapter.modules)

    def to_original(self, adapter: Adapter) -> Adapter:
        """``adapter`` with this family's diffusers modules fused onto the original layers (kohya output);
        one error naming every ``transformer.`` module no table row maps."""
        ours = {n: m for n, m in adapter.modules.items() if n.startswith(self.prefix)}
        fused, unmapped = fuse_all(ours, self.original, prefix=self.prefix)
        if unmapped:
            raise unmapped_error(unmapped, f"{self.name} original-layout")
        rest = {n: m for n, m in adapter.modules.items() if n not in ours}
        return replace(adapter, modules={**fused, **rest})


def _maps(layout: Layout, key: str) -> bool:
    match = layout.pattern.fullmatch(key)
    return match is not None and layout.table.forward(match["module"], flat=layout.flat) is not None


def read_modules(header: Header, pattern: re.Pattern[str]) -> dict[str, LoraModule]:
    """Module name -> factors of every key ``pattern`` reads; one error listing keys it does not, or incomplete pairs."""
    parts: dict[str, dict[str, str]] = {}
    unknown = []
    for key in header.tensors:
        match = pattern.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        parts.setdefault(match["module"], {})[ROLES[match["role"]]] = key
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise FormatError(
            f"{len(unknown)} tensor(s) are not LoRA factors of this layout: {listed}", path=header.path, code="layout-unmapped"
        )
    for name, p in parts.items():
        missing = spec.missing_factor({"A" if s == kohya.DOWN else "B" for s in p if s in (kohya.DOWN, kohya.UP)})
        if missing is not None:
            raise FormatError(missing[1], path=header.path, key=name, code=missing[0])
    tensors = load_tensors(header)
    return {name: kohya.lora_module(tensors, header.path, name, p) for name, p in parts.items()}


def _original_base(base: str | Path, marker: str) -> bool:
    """Whether checkpoint ``base`` is in the original layout (keys such as ``double_blocks.``), headers only."""
    return any(marker in key for key in open_checkpoint(base).tensors)
