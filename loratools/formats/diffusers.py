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

Written files use the first layout with every module's scale folded into ``lora_B`` and no alphas
or ``lora_adapter_metadata``: with neither, diffusers applies B·A as stored, per module, whatever
the ranks (diffusers 0.42 ``utils/peft_utils.get_peft_kwargs`` mirrors each rank into its alpha),
so the file means the same ΔW in every diffusers version that reads PEFT-keyed files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .. import spec
from ..adapter import Adapter, LoraModule, RawAdapter, raw_from_modules
from ..errors import ArgumentError, FormatError
from ..io.atomic import atomic_output
from ..io.tensorfile import Header, load_tensors, write_file
from .kohya import alpha_value

META_ADAPTER = spec.META_DIFFUSERS_CONFIG
_COMPONENTS = spec.DIFFUSERS_COMPONENTS

_ROLE = {"down": "A", "up": "B", "A": "A", "B": "B"}
_PATTERNS = (
    re.compile(r"^(?P<head>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight\Z"),
    re.compile(r"^(?P<module>.+?)\.(?:lora_linear_layer|lora_layer|lora)\.(?P<role>down|up)\.weight\Z"),
    re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)\.weight\Z"),
    re.compile(r"^(?P<module>.+)\.(?P<role>lora_magnitude_vector)(?:\.weight)?\Z"),
    re.compile(r"^(?P<module>.+)\.lora_B\.(?P<role>bias)\Z"),
    re.compile(r"^(?P<module>.+?)(?:\.lora_linear_layer|\.lora_layer|\.lora)?\.(?P<role>alpha)\Z"),  # \Z, not $: no key ending in a newline
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
    tensors = load_tensors(header)
    for key, tensor in tensors.items():
        parsed = _parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        parts.setdefault(parsed[0], {})[parsed[1]] = tensor
    if unknown:
        raise FormatError(f"diffusers LoRA file holds tensors that are not LoRA factors: {', '.join(unknown[:5])}", path=header.path)
    configs = _component_configs(header)
    for name, p in parts.items():
        missing = spec.missing_factor(p)
        if missing is not None:
            raise FormatError(missing[1], path=header.path, key=name, code=missing[0])
    alphas = _config_alphas(parts, configs)
    modules = {name: _module(header, name, p, _config_of(name, configs)[1], alphas.get(name)) for name, p in parts.items()}
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


def _module(header: Header, name: str, p: dict[str, torch.Tensor], config: dict[str, Any], config_alpha: float | None) -> LoraModule:
    """One module: alpha from its ``.alpha`` tensor, else its config's, else r (scale 1)."""
    A, B = p["A"], p["B"]
    why = spec.factor_shape_problem(A.shape, B.shape)
    if why:
        raise FormatError(f"down {list(A.shape)} and up {list(B.shape)}: {why}", path=header.path, key=name, code="bad-shape")
    rslora = bool(config.get("use_rslora", False))
    if "alpha" in p:
        alpha = alpha_value(p["alpha"], path=header.path, key=f"{name}.alpha")
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
    except (json.JSONDecodeError, RecursionError, ValueError) as err:  # ValueError: ints of over 4300 digits
        raise FormatError(
            f"{META_ADAPTER} metadata is not valid JSON ({getattr(err, 'msg', 'too deep or too long')})", path=header.path
        ) from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in (blob if isinstance(blob, dict) else {}).items():
        component = next((c for c in _COMPONENTS if key.startswith(c)), "")
        configs.setdefault(component, {})[key[len(component) :]] = value
    for component, config in configs.items():
        for field, message in spec.scaling_problems(config):
            raise FormatError(f"{META_ADAPTER} {component}{field} {message}", path=header.path, code="config-schema")
    return configs


def component(module: str) -> str | None:
    """The diffusers component a module path belongs to (``"unet"``, ``"text_encoder"``, ...), or None."""
    prefix = next((c for c in _COMPONENTS if module.startswith(c)), None)
    return prefix[:-1] if prefix else None


def _owner(module: str) -> str:
    """:func:`component`, or :class:`ArgumentError` naming a module that belongs to none."""
    owner = component(module)
    if owner is None:
        raise ArgumentError(
            f"module {module} belongs to no diffusers component (unet., transformer., text_encoder., ...), "
            "so no diffusers model would apply it; write peft or kohya output instead"
        )
    return owner


def components(adapter: Adapter) -> dict[str, Adapter]:
    """``adapter`` split per component, module names relative to it (what PEFT applies to that model)."""
    parts: dict[str, dict[str, LoraModule]] = {}
    for name, module in adapter.modules.items():
        owner = _owner(name)
        parts.setdefault(owner, {})[name[len(owner) + 1 :]] = module
    config = {k: v for k, v in adapter.config.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}
    return {owner: Adapter(modules, dict(config), {}, dict(adapter.metadata)) for owner, modules in parts.items()}


def state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` in diffusers' PEFT-keyed layout, each module's scale folded into ``lora_B``."""
    if adapter.extra_tensors:
        names = ", ".join(list(adapter.extra_tensors)[:3])
        raise FormatError(f"diffusers LoRA files cannot hold full tensors (modules_to_save: {names}); convert to peft instead")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        _owner(name)
        a, b = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{name}.{a}"] = m.A.contiguous()
        tensors[f"{name}.{b}"] = (m.B.float() * m.scale).to(m.B.dtype).contiguous()
        if m.bias is not None:
            tensors[f"{name}.lora_B.bias"] = (m.bias.float() * m.scale).to(m.bias.dtype).contiguous()
        if m.magnitude is not None:
            tensors[f"{name}.lora_magnitude_vector"] = m.magnitude.contiguous()
    return tensors


def write(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """Write ``adapter`` as a diffusers LoRA: ``path`` itself if it ends in ``.safetensors``, else a
    directory holding ``pytorch_lora_weights.safetensors``; atomic, with a data checksum."""
    tensors = state_dict(adapter)
    meta = adapter.foreign_metadata()
    meta[spec.META_FORMAT] = "pt"
    single = path.suffix == ".safetensors"
    with atomic_output(path, force=force, directory=not single) as tmp:
        target = tmp if single else tmp / spec.DIFFUSERS_WEIGHTS_NAME
        write_file(target, tensors, meta, checksum_key=spec.META_SHA256, layout_key=spec.META_LAYOUT)
    return path
