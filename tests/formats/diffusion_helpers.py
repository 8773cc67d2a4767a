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
