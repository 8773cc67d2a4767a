"""Per module, the ΔW each runtime would apply versus what the adapter means; and the output convention.

:func:`problems` reads an adapter as a runtime would read the file loratools writes for it
(:func:`views`) and reports, as :class:`~loratools.errors.Problem` records:

- ``runtime-misscaled`` (error): the runtime applies ΔW x factor, factor != 1 (a wrong model, silently);
- ``runtime-unsupported`` (error): a feature the runtime refuses at load or drops silently (DoRA,
  modules_to_save, lora_B.bias, embeddings, conv);
- ``runtime-layout`` (error): kohya module names for a PEFT-reading runtime;
- ``runtime-rank-limit`` (warning): a rank above the runtime's default ceiling (a flag raises it).

:func:`conform` rewrites an adapter so that it means the same ΔW and is exact in the runtimes named
(see its docstring for the default convention).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from .. import spec
from ..adapter import Adapter, LoraModule
from ..errors import ArgumentError, InvalidAdapterError, Problem
from .profile import Feature, Layout, Profile, View
from .registry import profiles as resolve

TOLERANCE = 1e-6  # relative; factors are ratios of scales, exact up to float rounding
# Config fields conform rewrites (Adapter.peft_config refits them from the modules).
_SCALE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def views(adapter: Adapter) -> dict[str, View]:
    """What a runtime reads about each module from the files :func:`loratools.save_as` writes for ``adapter``."""
    config = adapter.peft_config()
    file_alphas = {name: m.scale * m.rank for name, m in adapter.modules.items()}  # kohya .alpha (formats/kohya.py)
    common = Counter(file_alphas.values()).most_common(1)[0][0] if file_alphas else 0.0
    out = {}
    for name, m in adapter.modules.items():
        out[name] = View(
            name=name,
            rank=m.rank,
            alpha=spec.module_alpha(config, name),
            rslora=bool(config.get("use_rslora")),
            config_r=int(config["r"]),
            config_alpha=float(config["lora_alpha"]),
            file_alpha=file_alphas[name],
            common_alpha=common,
        )
    return out


def features(adapter: Adapter) -> dict[Feature, list[str]]:
    """Which modules (or full tensors) use each feature some runtime cannot apply."""
    found: dict[Feature, list[str]] = {
        "dora": [n for n, m in adapter.modules.items() if m.magnitude is not None],
        "bias": [n for n, m in adapter.modules.items() if m.bias is not None],
        "embedding": [n for n, m in adapter.modules.items() if m.kind == "embedding"],
        "conv": [n for n, m in adapter.modules.items() if m.kind == "conv"],
        "modules_to_save": sorted(adapter.extra_tensors),
    }
    return {k: v for k, v in found.items() if v}


def factors(adapter: Adapter, profile: Profile) -> dict[str, float]:
    """Per module, (ΔW the runtime applies) / (ΔW the adapter means): its scale over PEFT's, as B·A is shared."""
    return {name: profile.scale(view) / adapter.modules[name].scale for name, view in views(adapter).items() if adapter.modules[name].scale}


def problems(adapter: Adapter, profile: Profile) -> list[Problem]:
    """Every way ``profile``'s runtime would apply ``adapter`` differently from its meaning, or refuse it."""
    found: list[Problem] = []
    where = f"[{profile.name}]"
    for feature, names in features(adapter).items():
        if feature in profile.refuses:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            message = f"{profile.name} {profile.refuses[feature]}{more}"
            found.append(Problem("runtime-unsupported", f"{names[0]} {where}", message))
    if profile.layout == "peft":
        kohya = [n for n in adapter.modules if spec.KOHYA_NAME.match(n)]
        if kohya:
            found.append(
                Problem(
                    "runtime-layout",
                    f"{kohya[0]} {where}",
                    f"{profile.name} reads PEFT module paths but {len(kohya)} module(s) keep kohya names; convert with --base first",
                )
            )
    top = max((m.rank for m in adapter.modules.values()), default=0)
    if profile.max_rank is not None and top > profile.max_rank:
        found.append(
            Problem(
                "runtime-rank-limit",
                where,
                f"rank {top} is above {profile.name}'s default limit {profile.max_rank}; {profile.max_rank_hint}",
                "warning",
            )
        )
    for name, factor in factors(adapter, profile).items():
        if not math.isclose(factor, 1.0, rel_tol=TOLERANCE):
            m = adapter.modules[name]
            found.append(
                Problem(
                    "runtime-misscaled",
                    f"{name} {where}",
                    f"{profile.name} applies ΔW x {factor:.4g} (scale {m.scale * factor:.6g} instead of {m.scale:.6g}: {profile.rule}); "
                    f"rewrite it with --for {profile.name}",
                )
            )
    return found


def runtime_factors(adapter: Adapter, runtime: str) -> dict[str, float]:
    """Per module, the factor by which the named runtime's ΔW differs from the adapter's (1: exact)."""
    if runtime == "all":
        raise ArgumentError("runtime_factors takes one runtime, not 'all'")
    (profile,) = resolve([runtime])
    return factors(adapter, profile)


def check(adapter: Adapter, runtimes: Iterable[str]) -> list[Problem]:
    """:func:`problems` for every runtime named (``all``: every profile reading the adapter's layout)."""
    layout: Layout = "kohya" if adapter.metadata.get(spec.META_SOURCE) == "kohya" else "peft"
    return [p for profile in resolve(runtimes, layout=layout) for p in problems(adapter, profile)]


def conform(adapter: Adapter, runtimes: Sequence[str] = (), *, layout: Layout = "peft") -> Adapter:
    """``adapter`` rewritten to mean the same ΔW and be applied exactly by the ``runtimes`` named.

    rsLoRA is always normalised (alpha·sqrt(r) as a plain alpha: SGLang and llama.cpp ignore
    ``use_rslora``).  Then one of two conventions, each scale folded into B (and lora_B.bias):

    - **one scale** (the default for PEFT output): every module gets the most common scale c, alpha
      c·r per module, so ``lora_alpha/r`` from the config (vLLM, SGLang) is exact, and PEFT reads
      the per-module alphas for other ranks;
    - **one alpha** (kohya output, and ``--for llama.cpp``/``diffusers``): every module gets the most
      common alpha·(scale x rank) a, so alpha/rank per tensor (llama.cpp, kohya, ComfyUI, diffusers'
      most-common alpha) is exact, with no ``alpha_pattern``.

    With mixed ranks and runtimes needing both, every module is zero-padded to the largest rank
    (A gets zero rows, B zero columns: ΔW unchanged) and both conventions coincide.  Raises
    :class:`~loratools.errors.InvalidAdapterError` listing what no rewrite fixes (DoRA for vLLM, ...).
    ``all`` names every runtime that reads ``layout``.
    """
    chosen = resolve(runtimes, layout=layout)
    needs = {p.needs for p in chosen} | ({"alpha"} if layout == "kohya" else set())
    ranks = {m.rank for m in adapter.modules.values()}
    modules = dict(adapter.modules)
    if len(ranks) > 1 and {"scale", "alpha"} <= needs:
        modules = {n: _pad(m, max(ranks)) for n, m in modules.items()}
    if modules:
        modules = _one_alpha(modules) if "alpha" in needs else _one_scale(modules)
    result = adapter
    if any(new is not adapter.modules[n] for n, new in modules.items()):
        config = {k: v for k, v in adapter.config.items() if k not in _SCALE_FIELDS}
        draft = Adapter(modules, config, adapter.extra_tensors, adapter.metadata)
        result = replace(draft, config=draft.peft_config())
    left = [p for profile in chosen for p in problems(result, profile) if p.severity == "error"]
    if left:
        raise InvalidAdapterError(left)
    return result


def _one_scale(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    c = Counter(m.scale for m in modules.values()).most_common(1)[0][0] or 1.0
    return {n: _refold(m, c * m.rank) for n, m in modules.items()}


def _one_alpha(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    a = Counter(m.scale * m.rank for m in modules.values()).most_common(1)[0][0] or 1.0  # llama.cpp: alpha 0 means scale 1
    return {n: _refold(m, a) for n, m in modules.items()}


def _refold(m: LoraModule, alpha: float) -> LoraModule:
    """``m`` with plain alpha ``alpha`` and B (and bias) times scale/(alpha/r), so ΔW is unchanged."""
    if not m.rslora and m.alpha == alpha:
        return m
    ratio = m.scale / spec.scaling(alpha, m.rank)
    if math.isclose(ratio, 1.0, rel_tol=1e-12):
        return replace(m, alpha=alpha, rslora=False)
    B = (m.B.to(torch.float64) * ratio).to(m.B.dtype)
    bias = None if m.bias is None else (m.bias.to(torch.float64) * ratio).to(m.bias.dtype)
    return replace(m, B=B, alpha=alpha, rslora=False, bias=bias)


def _pad(m: LoraModule, rank: int) -> LoraModule:
    """``m`` at ``rank`` >= its own by zero rows of A and zero columns of B; alpha scaled so the scale is kept."""
    extra = rank - m.rank
    if extra == 0:
        return m
    A = torch.cat([m.A, m.A.new_zeros((extra, *m.A.shape[1:]))], 0)
    B = torch.cat([m.B, m.B.new_zeros((m.B.shape[0], extra, *m.B.shape[2:]))], 1)
    # keep s: alpha/r (or alpha/sqrt(r)) at the new rank
    alpha = m.scale * (math.sqrt(rank) if m.rslora else rank)
    return replace(m, A=A, B=B, alpha=alpha)
