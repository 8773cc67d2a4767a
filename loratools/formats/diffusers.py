"""diffusers LoRA files (``pytorch_lora_weights.safetensors``) read into an :class:`Adapter`.

diffusers has written LoRAs in four layouts over time, all single files without a PEFT config:

- PEFT keys behind a component prefix: ``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight``
  (scaling in the ``lora_adapter_metadata`` JSON when present, keys per component like ``unet.lora_alpha``);
- ``<module>.lora_linear_layer.down.weight`` / ``.up.weight`` (patched text-encoder projections);
- ``<module>.lora.down.weight`` / ``.lora_layer.up.weight`` (LoRACompatibleLinear/Conv);
- attention processors: ``<block>.processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0``), unet only.

``down`` is A (r x in), ``up`` is B (out x r).  An ``<module>.alpha`` tensor gives alpha; otherwise alpha = r
(scale 1), which is what diffusers applies.  Module names keep the component prefix (``unet.``,
``text_encoder.``), which base lookup tolerates.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from safetensors import safe_open

from .. import spec
from ..adapter import LoraModule, RawAdapter, raw_from_modules
from ..errors import FormatError
from ..io.tensorfile import Header

META_ADAPTER = "lora_adapter_metadata"
_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "prior.")

_ROLE = {"down": "A", "up": "B", "A": "A", "B": "B"}
_PATTERNS = (
    re.compile(r"^(?P<head>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"),
    re.compile(r"^(?P<module>.+?)\.(?:lora_linear_layer|lora_layer|lora)\.(?P<role>down|up)\.weight$"),
    re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)\.weight$"),
    re.compile(r"^(?P<module>.+)\.(?P<role>lora_magnitude_vector)(?:\.weight)?$"),
    re.compile(r"^(?P<module>.+)\.lora_B\.(?P<role>bias)$"),
    re.compile(r"^(?P<module>.+?)(?:\.lora_linear_layer|\.lora_layer|\.lora)?\.(?P<role>alpha)$"),
)


def is_diffusers(names: list[str]) -> bool:
    """Whether ``names`` look like a diffusers LoRA file (and not a PEFT ``base_model.model.`` one)."""
    if any(n.startswith(spec.PREFIX) for n in names):
        return False
    return any((parsed := _parse(n)) is not None and parsed[1] in ("A", "B") for n in names)


def _parse(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a diffusers LoRA tensor key; role in A, B, magnitude, bias, alpha."""
    for pattern in _PATTERNS:
        match = pattern.match(key)
        if match is None:
            continue
        groups = match.groupdict()
        if "head" in groups:
            proj = "to_out.0" if groups["proj"] == "to_out" else groups["proj"]
            head = groups["head"] if groups["head"].startswith(_COMPONENTS) else "unet." + groups["head"]
            return f"{head}.{proj}", _ROLE[groups["role"]]
        role = groups["role"]
        return groups["module"], _ROLE.get(role, "magnitude" if role == "lora_magnitude_vector" else role)
    return None


def read(header: Header) -> RawAdapter:
    """Read the diffusers LoRA file behind ``header`` as a spec v1 :class:`RawAdapter` (config synthesized)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    with safe_open(str(header.path), framework="pt") as fh:
        for key in header.tensors:
            parsed = _parse(key)
            if parsed is None:
                unknown.append(key)
                continue
            parts.setdefault(parsed[0], {})[parsed[1]] = fh.get_tensor(key)
    if unknown:
        raise FormatError(f"diffusers LoRA file holds tensors that are not LoRA factors: {', '.join(unknown[:5])}", path=header.path)
    configs = _component_configs(header)
    for name, p in parts.items():
        missing = spec.missing_factor(p)
        if missing is not None:
            raise FormatError(missing[1], path=header.path, key=name, code=missing[0])
    alphas = _config_alphas(parts, configs)
    modules = {name: _module(p, _config_of(name, configs)[1], alphas.get(name)) for name, p in parts.items()}
    return raw_from_modules(modules, header, {**header.metadata, spec.META_SOURCE: "diffusers"})


def _config_of(name: str, configs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The component prefix of module ``name`` and the PEFT config stored for it ({} if none)."""
    component = next((c for c in _COMPONENTS if name.startswith(c)), "")
    return component, configs.get(component) or configs.get("") or {}


def _config_alphas(parts: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Alphas from the component configs' ``lora_alpha``/``alpha_pattern``, one pattern pass per component."""
    groups: dict[str, list[str]] = {}
    for name, p in parts.items():
        component, config = _config_of(name, configs)
        if "alpha" not in p and "lora_alpha" in config:
            groups.setdefault(component, []).append(name)
    alphas: dict[str, float] = {}
    for component, names in groups.items():
        config = _config_of(names[0], configs)[1]
        alphas.update(zip(names, spec.module_alphas(config, [n[len(component) :] for n in names]), strict=True))
    return alphas


def _module(p: dict[str, torch.Tensor], config: dict[str, Any], config_alpha: float | None) -> LoraModule:
    """One module: alpha from its ``.alpha`` tensor, else its config's, else r (scale 1)."""
    A, B = p["A"], p["B"]
    rslora = bool(config.get("use_rslora", False))
    if "alpha" in p:
        alpha = float(p["alpha"].float().item())
    elif config_alpha is not None:
        alpha = config_alpha
    else:
        alpha = float(A.shape[0])
    return LoraModule(A, B, alpha, rslora, "conv" if A.dim() > 2 else "linear", p.get("magnitude"), p.get("bias"))


def _component_configs(header: Header) -> dict[str, dict[str, Any]]:
    """PEFT configs from ``lora_adapter_metadata``: per component prefix ("unet.", ...), "" for an unprefixed one."""
    text = header.metadata.get(META_ADAPTER)
    if not text:
        return {}
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"{META_ADAPTER} metadata is not valid JSON ({err.msg})", path=header.path) from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in (blob if isinstance(blob, dict) else {}).items():
        component = next((c for c in _COMPONENTS if key.startswith(c)), "")
        configs.setdefault(component, {})[key[len(component) :]] = value
    return configs
