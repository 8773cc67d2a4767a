"""The runtime profiles by name, and the names a command's ``--for`` accepts (``all`` means every one)."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ArgumentError
from .comfyui import COMFYUI
from .diffusers import DIFFUSERS
from .kohya import KOHYA
from .llamacpp import LLAMA_CPP
from .peft import PEFT, TRANSFORMERS
from .profile import Layout, Profile
from .sglang import SGLANG
from .vllm import VLLM

PROFILES: dict[str, Profile] = {p.name: p for p in (PEFT, TRANSFORMERS, VLLM, SGLANG, LLAMA_CPP, DIFFUSERS, KOHYA, COMFYUI)}
RUNTIME_CHOICES: tuple[str, ...] = (*PROFILES, "all")


def profiles(names: Iterable[str], *, layout: Layout | None = None) -> list[Profile]:
    """The profiles named, in order, each once; :class:`ArgumentError` for an unknown name.

    ``all`` means every profile, or with ``layout`` every one that reads that layout (vLLM does not
    read kohya files, so ``--for all`` on a kohya output asks nothing of it).
    """
    chosen: dict[str, Profile] = {}
    for name in names:
        if name == "all":
            chosen.update({n: p for n, p in PROFILES.items() if layout is None or p.layout == layout})
        elif name in PROFILES:
            chosen[name] = PROFILES[name]
        else:
            raise ArgumentError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    return list(chosen.values())
