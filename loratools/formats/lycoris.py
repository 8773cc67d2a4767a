"""LyCORIS files (kohya-named): LoHa and LoKr modules read exactly as plain LoRA; Tucker LoCon refused.

A LyCORIS file names modules as kohya does (``lora_unet_...``) and may mix kinds module by module:
LoHa (``hada_*``, :mod:`.loha`), LoKr (``lokr_*``, :mod:`.lokr`) and LoCon/plain LoRA
(``lora_down``/``lora_up``, read by :mod:`.kohya`'s rules).  LoHa and LoKr become exact LoRA factors
of rank r1·r2, so validation, merge, arithmetic and every writer treat them as any LoRA.

Refused in one line: ``lora_mid`` (Tucker conv LoCon, whose up·mid·down is not yet read) and
``dora_scale`` on LoHa/LoKr modules (DoRA re-normalises W + ΔW; not read yet), and any tensor none of
these layouts names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from ..adapter import LoraModule, RawAdapter
from ..errors import FormatError
from ..io.checkpoint import find_weight, module_index, open_checkpoint
from ..io.tensorfile import Header, load_tensors
from . import kohya, loha, lokr

_OTHER = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
_SUFFIX = re.compile(r"(?P<module>.+)\.(?P<suffix>" + "|".join(re.escape(s) for s in (*loha.SUFFIXES, *lokr.SUFFIXES, *_OTHER)) + ")")


def is_lycoris(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` hold any LoHa or LoKr module."""
    return any(".hada_w" in n or ".lokr_w" in n for n in names)


def refuse(header: Header) -> None:
    """Raise :class:`FormatError` (``foreign-format``) for Tucker LoCon (``lora_mid``), which no reader takes yet."""
    key = next((name for name in header.tensors if ".lora_mid." in name), None)
    if key is not None:
        raise FormatError(
            "this is a LyCORIS LoCon/Tucker adapter (lora_mid tensors); its conv factors are not a plain up·down product, "
            "and loratools does not read them yet",
            path=header.path,
            key=key,
            code="foreign-format",
        )


def read(header: Header, *, base: str | Path | None = None) -> RawAdapter:
    """The LyCORIS file behind ``header`` as a spec v1 :class:`RawAdapter` (kohya names mapped with ``base``)."""
    refuse(header)
    parts: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        match = _SUFFIX.fullmatch(key)
        if match is None:
            raise FormatError("LyCORIS file holds a tensor that is not a LoHa, LoKr or LoRA factor", path=header.path, key=key)
        parts.setdefault(match["module"], {})[match["suffix"]] = key
    tensors = load_tensors(header)
    modules: dict[str, LoraModule] = {}
    lycoris_names = []
    for name, p in parts.items():
        if "lora_down.weight" in p or "lora_up.weight" in p:
            kparts = {"." + s: k for s, k in p.items()}
            modules[name] = kohya.lora_module(tensors, header.path, name, kparts)
            continue
        alpha = kohya.alpha_value(tensors[p["alpha"]], path=header.path, key=p["alpha"]) if "alpha" in p else None
        if "dora_scale" in p:
            raise FormatError(
                "dora_scale on a LoHa/LoKr module (DoRA re-normalises W + ΔW) is not read yet", path=header.path, key=p["dora_scale"]
            )
        local = {s: tensors[k] for s, k in p.items() if s != "alpha"}
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
    return kohya.from_modules(header, modules, base=base)


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
