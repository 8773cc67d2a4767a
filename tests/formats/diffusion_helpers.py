"""Shared helpers for the diffusion-layout tests: diffusers' own loaders on tiny models, and the ΔW they apply."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import loratools

peft = __import__("peft")


class Pipe:
    """The smallest object a diffusers ``*LoraLoaderMixin.load_lora_weights`` accepts: named components, no device map."""

    hf_device_map = None

    def __init__(self, **components: torch.nn.Module | None):
        self._components = components
        for name, module in components.items():
            setattr(self, name, module)

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self._components.items() if v is not None}


def load_into(mixin: type, lora: Path | dict, **components: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """diffusers loading ``lora`` (a file, or a state dict) into ``components`` as its pipeline would."""
    pipe = type("P", (Pipe, mixin), {})(**components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora))
    return pipe.components


def applied_deltas(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer diffusers injected, by ``<component>.<module path>`` (float32)."""
    out = {}
    for cname, model in components.items():
        for name, layer in model.named_modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                for adapter in layer.lora_A:
                    out[f"{cname}.{name}"] = layer.get_delta_weight(adapter).float()
    return out


def our_deltas(lora: Path, **load: object) -> dict[str, torch.Tensor]:
    """ΔW of every module loratools reads from ``lora``."""
    return {n: m.delta() for n, m in loratools.load(lora, **load).modules.items()}  # type: ignore[arg-type]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over modules both hold (the callers check the key sets first)."""
    return max(float((a[k].reshape(b[k].shape) - b[k]).abs().max()) for k in a)


def original_checkpoint(state_dict: dict[str, torch.Tensor], table, blocks: int, renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """A diffusers model's ``state_dict`` in the original layout ``table`` describes: fused parts' rows concatenated,
    (scale, shift) pairs swapped back; ``renames`` (diffusers key -> original key) for tensors outside the table."""
    out, used = {}, set()
    for row in table.rows:
        for i in range(blocks) if "{i}" in row.source else [None]:
            sub = (lambda t: t.replace("{i}", str(i))) if i is not None else (lambda t: t)  # noqa: B023
            for param in ("weight", "bias"):
                keys = [f"{sub(t)}.{param}" for t in row.targets]
                if not all(k in state_dict for k in keys):
                    continue
                fused = torch.cat([state_dict[k] for k in keys])
                inp = state_dict[keys[0].rsplit(".", 1)[0] + ".weight"].shape[-1] if fused.dim() else 0
                if row.rule == "adaln" and fused.shape[0] == 2 * inp:
                    fused = torch.cat([fused[inp:], fused[:inp]])
                out[f"{sub(row.source)}.{param}"] = fused
                used.update(keys)
    for key, tensor in state_dict.items():
        if key not in used:
            out[renames.get(key, key)] = tensor
    return out
