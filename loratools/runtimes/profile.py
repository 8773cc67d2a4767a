"""What a runtime profile is: how one runtime scales each module of a file we write, and what it cannot apply.

A profile is data.  ``scale(view)`` is the s the runtime multiplies ``B·A`` by for one module,
computed only from what that runtime reads from the file (:class:`View`): the tensor rank, the
PEFT config's global ``r``/``lora_alpha`` and patterns, ``use_rslora``, or kohya's per-module
``.alpha``.  The adapter *means* ``m.scale·B·A`` (PEFT's rule), so the runtime applies ΔW times
``scale(view) / m.scale``; :func:`loratools.runtimes.check.problems` reports every factor that is not 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Layout = Literal["peft", "kohya"]
# What exactness needs of every module: one lora_alpha/r for all ("scale"), one alpha for all so
# alpha/rank is right per tensor ("alpha"), or nothing (the runtime reads per-module values).
Needs = Literal["scale", "alpha", "none"]
Feature = Literal["dora", "modules_to_save", "bias", "embedding", "conv"]


@dataclass(frozen=True)
class View:
    """What a runtime reads about one module from the file loratools writes for it.

    ``rank`` is the tensor's (A's rows); ``alpha`` the PEFT-resolved one (``lora_alpha`` or the
    ``alpha_pattern`` entry); ``config_r``/``config_alpha`` the global fields; ``file_alpha`` the
    kohya ``.alpha`` (scale x rank, rsLoRA folded); ``common_alpha`` the most common ``file_alpha``.
    """

    name: str
    rank: int
    alpha: float
    rslora: bool
    config_r: int
    config_alpha: float
    file_alpha: float
    common_alpha: float


@dataclass(frozen=True)
class Profile:
    """One runtime's rules, each citing the source file and version it was read from (see ``sources``)."""

    name: str
    layout: Layout  # which file it reads: a PEFT adapter (directory) or a kohya .safetensors
    keys: str  # the tensor names it expects
    rule: str  # the scale rule in words, for messages
    scale: Callable[[View], float]
    needs: Needs
    sources: tuple[str, ...]
    ignores: tuple[str, ...] = ()  # config fields it does not read
    refuses: Mapping[Feature, str] = field(default_factory=dict)  # feature -> what the runtime does with it
    max_rank: int | None = None  # the default ceiling (a server flag may raise it)
    max_rank_hint: str = ""
