"""MLX-LM LoRA adapters: ``adapters.safetensors`` + ``adapter_config.json`` (mlx-lm's own fields).

mlx-lm (``mlx_lm/tuner/lora.py``, ``LoRALinear``) stores per linear module ``<module>.lora_a``
(in x r) and ``<module>.lora_b`` (r x out), transposed relative to PEFT, and applies
y = W·x + scale·((x·lora_a)·lora_b); ``fuse`` adds ΔW = (scale·lora_bᵀ)·lora_aᵀ.  So PEFT's
A = lora_aᵀ, B = lora_bᵀ, and the one direct ``lora_parameters.scale`` replaces alpha/r.  Transposes
are exact, so tensors round-trip bit for bit; alpha is chosen so that alpha/r is exactly the scale.

mlx-lm (``mlx_lm/tuner/utils.py``, ``load_adapters`` / ``linear_to_lora_layers``) wraps, in each of
the last ``num_layers`` blocks of ``model.layers``, the modules whose block-relative names are in
``lora_parameters.keys`` (and model-level modules whose full name is a key), all with one
``rank`` and ``scale``, then loads the weights non-strictly.  A module mlx-lm would not wrap would
silently lose its weights, so the writer names every module it holds: ``num_layers`` -1 (every
block; ``layers[-max(-1, 0):]`` is all of them) and the keys of every module.  Wrapped modules the
file has no weights for keep a zero ``lora_b``: ΔW = 0, exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import spec
from ..adapter import Adapter, LoraModule, RawAdapter, raw_from_modules
from ..errors import FormatError
from ..io.atomic import atomic_output
from ..io.files import read_text
from ..io.tensorfile import Header, load_tensors, write_file

WEIGHTS_NAME = "adapters.safetensors"  # mlx-lm's adapter file; its config is spec.CONFIG_NAME, as PEFT's
LORA_A, LORA_B = ".lora_a", ".lora_b"
_ROLES = {LORA_A: "A", LORA_B: "B"}
_BLOCK = re.compile(r"^(?P<owner>.*\blayers)\.(?P<index>\d+)\.(?P<key>.+)$")


def is_mlx(names: Mapping[str, Any]) -> bool:
    """Whether tensor ``names`` look like an mlx-lm adapter (any ``.lora_a``/``.lora_b``; PEFT's are ``lora_A``)."""
    return any(n.endswith((LORA_A, LORA_B)) for n in names)


def read(header: Header, config_path: Path) -> RawAdapter:
    """The mlx-lm adapter behind ``header`` as a spec v1 :class:`RawAdapter`; its config from ``config_path``.

    Refused in one line: no config (the scale lives only there), a fine_tune_type other than
    ``lora`` (``dora`` and ``full`` are not LoRA factors), a scale that is not a finite number,
    tensors that are not 2-D lora_a/lora_b pairs (mlx-lm's SwitchLinear experts are 3-D).
    """
    config = _config(header, config_path)
    scale = _scale(config, config_path)
    parts: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        if suffix is None:
            raise FormatError("mlx-lm adapter holds a tensor that is not a lora_a/lora_b factor", path=header.path, key=key)
        parts.setdefault(key[: -len(suffix)], {})[suffix] = key
    tensors = load_tensors(header)
    modules = {}
    for name, p in parts.items():
        missing = spec.missing_factor({_ROLES[s] for s in p})
        if missing is not None:
            raise FormatError(missing[1], path=header.path, key=name, code=missing[0])
        a, b = tensors[p[LORA_A]], tensors[p[LORA_B]]
        if a.dim() != 2 or b.dim() != 2:
            raise FormatError(
                f"lora_a {list(a.shape)} and lora_b {list(b.shape)} are not 2-D (mlx-lm SwitchLinear experts are not supported)",
                path=header.path,
                key=name,
                code="bad-shape",
            )
        A, B = a.T.contiguous(), b.T.contiguous()
        why = spec.factor_shape_problem(A.shape, B.shape)
        if a.shape[1] != b.shape[0]:
            why = f"lora_a has rank {a.shape[1]} (its columns) but lora_b has rank {b.shape[0]} (its rows)"
        if why:
            raise FormatError(f"lora_a {list(a.shape)} and lora_b {list(b.shape)}: {why}", path=header.path, key=name, code="bad-shape")
        modules[name] = LoraModule(A, B, spec.alpha_for(scale, int(A.shape[0])))
    metadata = dict(header.metadata)
    metadata[spec.META_SOURCE] = "mlx"
    return raw_from_modules(modules, header, metadata)


def _config(header: Header, config_path: Path) -> dict[str, Any]:
    if not config_path.exists():
        raise FormatError(
            f"an mlx-lm adapter needs its {spec.CONFIG_NAME} beside it (its lora_parameters.scale sets ΔW)",
            path=header.path,
            code="config-missing",
        )
    try:
        config = json.loads(read_text(config_path))
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise FormatError(f"not valid JSON ({err})", path=config_path, code="config-invalid") from None
    if not isinstance(config, dict):
        raise FormatError("an mlx-lm adapter config is a JSON object", path=config_path, code="config-invalid")
    kind = config.get("fine_tune_type", "lora")  # mlx_lm/tuner/utils.py load_adapters: missing means lora
    if kind != "lora":
        raise FormatError(
            f"fine_tune_type {spec.clip(kind)}: only mlx-lm LoRA adapters are read (DoRA and full fine-tunes are not LoRA factors)",
            path=config_path,
            code="foreign-format",
        )
    return config


def _scale(config: Mapping[str, Any], config_path: Path) -> float:
    params = config.get("lora_parameters")
    value = params.get("scale") if isinstance(params, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(
            f"lora_parameters.scale is {spec.clip(value)}; an mlx-lm adapter needs one finite number", path=config_path, code="bad-alpha"
        )
    return float(value)


def mlx_state(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of ``adapter`` in mlx-lm's layout; refuses what mlx-lm cannot load.

    mlx-lm builds every wrapped module with one rank and one scale, as plain linears (no DoRA
    magnitudes, no lora_B bias, no fan_in_fan_out); embeddings, conv and expert parameters and
    ``modules_to_save`` have no form here.
    """
    if not adapter.modules:
        raise FormatError("an mlx-lm adapter needs at least one LoRA module")
    if adapter.extra_tensors:
        raise FormatError(f"mlx-lm adapters cannot hold modules_to_save tensors ({', '.join(list(adapter.extra_tensors)[:3])})")
    if adapter.fan_in_fan_out:
        raise FormatError("mlx-lm adapters have no fan_in_fan_out (transposed Conv1D) layers; convert to peft instead")
    tensors: dict[str, torch.Tensor] = {}
    keys: set[str] = set()
    for name, m in adapter.modules.items():
        if spec.KOHYA_NAME.match(name):  # mlx-lm loads weights non-strictly: an unknown name would be dropped silently
            raise FormatError(
                "module still has its kohya name (read without a base), which mlx-lm would silently ignore; "
                "map the names with `loratools convert FILE --to mlx --base BASE`",
                key=name,
            )
        if m.kind != "linear" or m.magnitude is not None or m.bias is not None:
            raise FormatError("mlx-lm adapters hold plain linear LoRA only (no conv, embedding, DoRA, lora_B.bias)", key=name)
        tensors[name + LORA_A] = m.A.T.contiguous()
        tensors[name + LORA_B] = m.B.T.contiguous()
        block = _BLOCK.match(name)
        keys.add(block["key"] if block else name)
    ranks = {m.rank for m in adapter.modules.values()}
    scales = {m.scale for m in adapter.modules.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise FormatError(
            f"mlx-lm applies one rank and one scale to every module; this adapter has ranks {sorted(ranks)} and scales {sorted(scales)} "
            "(resize it to one rank first)"
        )
    params = {"rank": ranks.pop(), "scale": scales.pop(), "dropout": 0.0, "keys": sorted(keys)}
    config: dict[str, Any] = {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": params}
    if adapter.base_model:
        config["model"] = adapter.base_model
    return tensors, config


def write(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """Write ``adapter`` as an mlx-lm adapter directory (``adapters.safetensors`` + ``adapter_config.json``), atomically."""
    tensors, config = mlx_state(adapter)
    meta = adapter.file_metadata()
    with atomic_output(path, force=force, directory=True) as tmp:
        write_file(tmp / WEIGHTS_NAME, tensors, meta, checksum_key=spec.META_SHA256, layout_key=spec.META_LAYOUT)
        (tmp / spec.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
