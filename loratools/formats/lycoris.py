"""LyCORIS files (kohya-named): LoHa, LoKr and Tucker LoCon modules read exactly as plain LoRA.

A LyCORIS file names modules as kohya does (``lora_unet_...``) and may mix kinds module by module:
LoHa (``hada_*``, :mod:`.loha`), LoKr (``lokr_*``, :mod:`.lokr`) and LoCon/plain LoRA
(``lora_down``/``lora_up``, read by :mod:`.kohya`'s rules, a Tucker ``lora_mid`` folded into the
down).  LoHa and LoKr become exact LoRA factors of rank r1·r2, so validation, merge, arithmetic and
every writer treat them as any LoRA.

``dora_scale`` (DoRA, DoHa, DoKr) is read along the axis its shape gives (:func:`.kohya.dora_magnitude`).
Refused in one line: any tensor none of these layouts names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import LoraModule, MagnitudeAxis, RawAdapter
from ..errors import FormatError
from ..io.checkpoint import find_weight, module_index, open_checkpoint
from ..io.tensorfile import Header, load_tensors, memory_bytes
from . import kohya, loha, lokr

_OTHER = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
_SUFFIX = re.compile(r"(?P<module>.+)\.(?P<suffix>" + "|".join(re.escape(s) for s in (*loha.SUFFIXES, *lokr.SUFFIXES, *_OTHER)) + ")")


def is_lycoris(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` hold any LoHa, LoKr or Tucker LoCon (``lora_mid``) module."""
    return any(".hada_w" in n or ".lokr_w" in n or ".lora_mid." in n for n in names)


def read(header: Header, *, base: str | Path | None = None) -> RawAdapter:
    """The LyCORIS file behind ``header`` as a spec v1 :class:`RawAdapter` (kohya names mapped with ``base``)."""
    parts: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        match = _SUFFIX.fullmatch(key)
        if match is None:
            raise FormatError("LyCORIS file holds a tensor that is not a LoHa, LoKr or LoRA factor", path=header.path, key=key)
        parts.setdefault(match["module"], {})[match["suffix"]] = key
    tensors = load_tensors(header)
    _refuse_amplification(header, parts, tensors)
    modules: dict[str, LoraModule] = {}
    lycoris_names = []
    hint = kohya.dora_hint(header.metadata)
    for name, p in parts.items():
        if "lora_down.weight" in p or "lora_up.weight" in p:
            kparts = {"." + s: k for s, k in p.items()}
            local = tensors
            if "lora_mid.weight" in p:
                local = _tucker_locon(tensors, header.path, name, p)
                kparts = {s: name + s for s in (kohya.DOWN, kohya.UP, kohya.ALPHA, kohya.DORA) if s in kparts}
            modules[name] = kohya.lora_module(local, header.path, name, kparts, hint=hint)
            continue
        if "lora_mid.weight" in p:
            raise FormatError("lora_mid without lora_down/lora_up", path=header.path, key=p["lora_mid.weight"], code="bad-shape")
        alpha = kohya.alpha_value(tensors[p["alpha"]], path=header.path, key=p["alpha"]) if "alpha" in p else None
        local = {s: tensors[k] for s, k in p.items() if s not in ("alpha", "dora_scale")}
        kind = loha if any(s.startswith("hada_") for s in local) else lokr
        if kind is loha and any(s.startswith("lokr_") for s in local):
            raise FormatError("module mixes LoHa (hada_*) and LoKr (lokr_*) tensors", path=header.path, key=name)
        module, why = kind.module(local, alpha)
        if module is None:
            raise FormatError(why or "not a LyCORIS module", path=header.path, key=name, code="bad-shape")
        modules[name] = module
        lycoris_names.append(name)
    if base is not None:
        modules |= _conv_shaped({n: modules[n] for n in lycoris_names}, base)
    for name in lycoris_names:  # DoHa/DoKr: the same DoRA step on W + ΔW (lycoris/modules/loha.py, lokr.py get_merged_weight)
        if "dora_scale" in parts[name]:
            modules[name] = _with_dora(modules[name], tensors[parts[name]["dora_scale"]], hint, header.path, parts[name]["dora_scale"])
    return kohya.from_modules(header, modules, base=base)


def _with_dora(m: LoraModule, dora: torch.Tensor, hint: MagnitudeAxis | None, path: Path, key: str) -> LoraModule:
    """LoHa/LoKr module ``m`` with its ``dora_scale``; a conv read with its kernel flattened needs the base to tell in-channels apart."""
    if m.kind == "linear" and dora.dim() == 4 and dora.shape[0] == 1:
        raise FormatError(
            "dora_scale runs along the input channels of a conv whose LoHa/LoKr halves store the kernel flattened; "
            "give the base (--base) so the kernel shape is known",
            path=path,
            key=key,
        )
    magnitude, axis = kohya.dora_magnitude(dora, m.A, m.B, hint=hint, path=path, key=key)
    return replace(m, magnitude=magnitude, magnitude_axis=axis)


def _refuse_amplification(header: Header, parts: Mapping[str, Mapping[str, str]], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before forming any, LoHa/LoKr factors larger than this machine's memory (kron of a few
    kilobytes can claim terabytes: a hostile file must cost a line, not the machine)."""
    need = 0
    for p in parts.values():
        local = {s: tensors[k] for s, k in p.items()}
        if any(s.startswith("hada_") for s in local):
            need += 4 * loha.factor_numel(local)
        elif any(s.startswith("lokr_") for s in local):
            need += 4 * lokr.factor_numel(local)
    limit = memory_bytes()
    if limit is not None and need > limit:
        raise FormatError(
            f"its LoHa/LoKr modules expand to {need / 2**30:.1f} GiB of exact LoRA factors, more than this machine's "
            f"{limit / 2**30:.1f} GiB of memory; refusing to form them",
            path=header.path,
        )


def _tucker_locon(tensors: Mapping[str, torch.Tensor], path: Path, name: str, p: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A Tucker LoCon module's tensors with lora_mid folded into lora_down: an exact conv LoRA of the same rank.

    LyCORIS 4.1.3 ``functional/locon.py`` ``_diff_weight``: ΔW[o, i, ...] = scale·Σ_ab mid[a, b, ...]·up[o, a]·down[b, i]
    (``rebuild_tucker``), so up stays B and A[a, i, ...] = Σ_b mid[a, b, ...]·down[b, i].
    """
    down, mid = tensors[p["lora_down.weight"]], tensors[p["lora_mid.weight"]]
    if "lora_up.weight" not in p:
        raise FormatError("Tucker LoCon module has no lora_up", path=path, key=name, code="lora-b-missing")
    if mid.dim() != 4 or down.shape[0] != mid.shape[1] or mid.shape[0] != mid.shape[1]:
        raise FormatError(
            f"lora_mid {list(mid.shape)} does not chain with lora_down {list(down.shape)}", path=path, key=name, code="bad-shape"
        )
    folded = torch.einsum("ab...,bi->ai...", mid.float(), down.reshape(down.shape[0], -1).float())
    out = {name + kohya.DOWN: folded.contiguous(), name + kohya.UP: tensors[p["lora_up.weight"]]}
    for suffix in ("alpha", "dora_scale"):
        if suffix in p:
            out[f"{name}.{suffix}"] = tensors[p[suffix]]
    return out


def _conv_shaped(modules: Mapping[str, LoraModule], base: str | Path) -> dict[str, LoraModule]:
    """Modules whose base weight is a conv, shaped as it: without a Tucker core LyCORIS builds conv halves
    with the kernel flattened into the input axis (``lycoris/modules/loha.py``: w_shape = (out, in·kh·kw))
    and reshapes ΔW to the conv weight, which is exactly a conv LoRA whose down is (r, in, kh, kw)."""
    mapped, _ = kohya.map_names(modules, base)
    tensors = open_checkpoint(base).tensors
    index = module_index(tensors)
    out = {}
    for name, m in modules.items():
        key = find_weight(mapped[name], index) if name in mapped else None
        shape = tensors[key].shape if key is not None else ()
        rank, rows = m.rank, int(m.B.shape[0])
        if m.kind == "linear" and len(shape) == 4 and shape[0] == rows and math.prod(shape[1:]) == m.A.shape[1]:
            out[name] = replace(m, A=m.A.reshape(rank, *shape[1:]), B=m.B.reshape(rows, rank, 1, 1), kind="conv")
    return out
