"""The runtime profiles by name, and the names a command's ``--for`` accepts (``all`` means every one)."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ArgumentError
from .comfyui import COMFYUI
from .diffusers import DIFFUSERS
from .kohya import KOHYA
from .llamacpp import LLAMA_CPP
from .peft import PEFT, TRANSFORMERS
from .profile import Profile
from .sglang import SGLANG
from .vllm import VLLM

PROFILES: dict[str, Profile] = {p.name: p for p in (PEFT, TRANSFORMERS, VLLM, SGLANG, LLAMA_CPP, DIFFUSERS, KOHYA, COMFYUI)}
RUNTIME_CHOICES: tuple[str, ...] = (*PROFILES, "all")


def profiles(names: Iterable[str]) -> list[Profile]:
    """The profiles named (``all``: every one), in order, each once; :class:`ArgumentError` for an unknown name."""
    chosen: dict[str, Profile] = {}
    for name in names:
        if name == "all":
            chosen.update(PROFILES)
        elif name in PROFILES:
            chosen[name] = PROFILES[name]
        else:
            raise ArgumentError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    return list(chosen.values())
