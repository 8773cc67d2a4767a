"""Read an adapter from disk into a :class:`RawAdapter`: config, tensors and metadata, unchecked.

This layer knows file layouts (a PEFT directory, a bare ``.safetensors`` file, kohya and diffusers
single files, which :mod:`loratools.kohya` and :mod:`loratools.diffusers` translate into the PEFT
layout) and refuses what it cannot read safely: pickles, corrupt safetensors, LyCORIS formats.  Whether the contents obey
the spec is :mod:`loratools.validate`'s job, so that validation can report every problem at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import spec
from .errors import FormatError, SpecError
from .tensorfile import Header, read_header

_FOREIGN = (
    (("hada_w1", "hada_w2"), "a LyCORIS LoHa adapter (hada_* tensors)", "LoHa is not LoRA: it has no B·A factorisation loratools can use"),
    (("lokr_w1", "lokr_w2"), "a LyCORIS LoKr adapter (lokr_* tensors)", "LoKr is not LoRA: it has no B·A factorisation loratools can use"),
)


@dataclass(frozen=True)
class RawAdapter:
    """What an adapter's files hold, before any spec check.

    ``config`` is ``None`` when no config could be found; ``header`` is the weights file's parsed
    safetensors header (``None`` for adapters built in memory).
    """

    source: str
    config: Any
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    header: Header | None = None
    config_error: str | None = None
    config_error_code: str = "config-invalid"  # or "config-missing"


def read_raw(path: str | Path, *, base: str | Path | None = None) -> RawAdapter:
    """Read the adapter at ``path``: a PEFT directory, a bare ``.safetensors`` file, a kohya/diffusers
    file, or ``hf://owner/name[@rev]`` (fetched into the huggingface_hub cache first, adapter files only).

    ``base`` (a checkpoint) is only used to map kohya's flattened module names onto module paths.
    """
    if isinstance(path, str) and path.startswith("hf://"):
        from .hub import fetch_uri  # local: hub imports the adapter layer, which imports this module

        path = fetch_uri(path)
    path = Path(path)
    if not path.exists():
        raise FormatError("no such file or directory", path=path)
    if path.is_dir():
        return _read_dir(path, base)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise _pickle_refused(path)
    weights = path
    config, config_error = None, None
    header = _read_lora_header(weights)
    foreign = _read_foreign(header, base, has_config=spec.META_CONFIG in header.metadata or (path.parent / spec.CONFIG_NAME).exists())
    if foreign is not None:
        return foreign
    if spec.META_CONFIG in header.metadata:
        config, config_error = _parse_json(header.metadata[spec.META_CONFIG], f"{weights} [{spec.META_CONFIG}]")
    elif (path.parent / spec.CONFIG_NAME).exists():
        config, config_error = _read_config(path.parent / spec.CONFIG_NAME)
    else:
        config_error = f"{weights}: no adapter config: put {spec.CONFIG_NAME} beside it or pass the adapter directory"
        return _finish(str(path), header, config, config_error, missing=True)
    return _finish(str(path), header, config, config_error)


def _read_foreign(header: Header, base: str | Path | None, *, has_config: bool) -> RawAdapter | None:
    """A kohya file, or a diffusers one when no PEFT config comes with it, read into the PEFT layout."""
    from . import diffusers, kohya  # local: they build on adapter.py, which imports this module

    if kohya.is_kohya(header.tensors):
        return kohya.read_kohya(header, base=base)
    if not has_config and diffusers.is_diffusers(list(header.tensors)):
        return diffusers.read_diffusers(header)
    return None


def _read_dir(path: Path, base: str | Path | None = None) -> RawAdapter:
    weights = path / spec.WEIGHTS_NAME
    if not weights.exists() and (path / spec.DIFFUSERS_WEIGHTS_NAME).exists():
        return read_raw(path / spec.DIFFUSERS_WEIGHTS_NAME, base=base)
    if not weights.exists():
        if (path / spec.PICKLE_WEIGHTS_NAME).exists():
            raise _pickle_refused(path / spec.PICKLE_WEIGHTS_NAME)
        raise SpecError(f"no {spec.WEIGHTS_NAME} in the adapter directory", path=path, code="weights-missing")
    header = _read_lora_header(weights)
    config_path = path / spec.CONFIG_NAME
    if config_path.exists():
        config, config_error = _read_config(config_path)
    else:
        message = f"{config_path}: missing; a PEFT adapter directory needs its {spec.CONFIG_NAME}"
        return _finish(str(path), header, None, message, missing=True)
    return _finish(str(path), header, config, config_error)


def _finish(source: str, header: Header, config: Any, config_error: str | None, *, missing: bool = False) -> RawAdapter:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(header.path), framework="pt") as fh:
        for name in header.tensors:
            tensors[name] = fh.get_tensor(name)
    code = "config-missing" if missing else "config-invalid"
    return RawAdapter(source, config, tensors, dict(header.metadata), header, config_error, code)


def _read_lora_header(weights: Path) -> Header:
    """The weights file's header, once LyCORIS layouts (not LoRA at all) have been refused by name."""
    header = read_header(weights)
    _refuse_foreign(header)
    return header


def _refuse_foreign(header: Header) -> None:
    names = list(header.tensors)
    for needles, what, why in _FOREIGN:
        if any(n in name for name in names for n in needles):
            raise FormatError(f"this is {what}; {why}", path=header.path, code="foreign-format")


def _pickle_refused(path: Path) -> FormatError:
    return FormatError(
        "pickle checkpoints are refused (loading one can run arbitrary code); "
        "re-save the adapter as safetensors, e.g. PeftModel.save_pretrained(..., safe_serialization=True)",
        path=path,
        code="pickle-refused",
    )


def _read_config(path: Path) -> tuple[Any, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{path}: cannot read ({err})"
    return _parse_json(text, str(path))


def _parse_json(text: str, where: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
