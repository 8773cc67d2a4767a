"""Move adapters between formats: spec v1 (PEFT) and kohya/sd-scripts.

Reading is automatic (:func:`loratools.load` recognises kohya and diffusers files); this module
chooses how to write.  Commands that produce an adapter write it in the format their input came
in (:func:`source_format`) unless told otherwise, through :func:`save_as`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .adapter import Adapter, load, save
from .errors import SpecError
from .kohya import META_SOURCE, save_kohya

Target = Literal["peft", "kohya"]
TARGETS: tuple[str, ...] = ("peft", "kohya")


def source_format(adapter: Adapter) -> Target:
    """The format to write ``adapter`` back in: ``kohya`` for adapters read from kohya files, else ``peft``.

    diffusers files are read but not written, so they come back as ``peft``.
    """
    return "kohya" if adapter.metadata.get(META_SOURCE) == "kohya" else "peft"


def save_as(adapter: Adapter, path: str | Path, *, to: Target | None = None, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` in format ``to`` (default: :func:`source_format`); atomic, refuses to overwrite without ``force``.

    ``peft`` writes spec v1 (a directory, or one file for a ``.safetensors`` path); ``kohya`` writes one
    ``.safetensors`` file in kohya naming.
    """
    to = to or source_format(adapter)
    if to == "kohya":
        if Path(path).suffix != ".safetensors":
            raise SpecError("a kohya output is a single file; give it a .safetensors name", path=path)
        return save_kohya(adapter, path, force=force, dtype=dtype)
    if to != "peft":
        raise SpecError(f"unknown output format {to!r}; choose one of {', '.join(TARGETS)}")
    return save(adapter, path, force=force, dtype=dtype)  # a PEFT write drops the kohya source marks


def convert(src: str | Path, out: str | Path, *, to: Target, base: str | Path | None = None, force: bool = False) -> Adapter:
    """Read the adapter at ``src`` (any format :func:`loratools.load` reads) and write it to ``out`` as ``to``.

    With ``base``, kohya names are mapped to the base's module paths (so a PEFT output loads on a
    model built from that base) and every module must fit; returns the adapter as converted.
    """
    adapter = load(src, base=base)
    save_as(adapter, out, to=to, force=force)
    return adapter
