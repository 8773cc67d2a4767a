"""The adapter value types: :class:`LoraModule`, :class:`Adapter`, and :class:`RawAdapter` (files as read).

An adapter is a set of :class:`LoraModule` factors keyed by module path (relative to the base model,
e.g. ``model.layers.0.self_attn.q_proj``), the PEFT config they came with, any full tensors that
replace base weights (``modules_to_save``), and file metadata.  Values are never changed in place:
operations build new adapters with :func:`dataclasses.replace`.  Reading and writing files is
:mod:`loratools.formats`' job and the checked public load/save is :mod:`loratools.api`'s; this layer
knows only how config fields and tensor keys describe modules (the fitted config of an output).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from . import metadata, spec
from .errors import ArgumentError
from .io.tensorfile import Header
from .linalg import flat

Kind = Literal["linear", "conv", "embedding", "parameter"]
# DoRA's magnitude: one per output feature, norms of W + ΔW's rows (PEFT, diffusers, LyCORIS
# wd_on_output=True), or one per input feature, norms of its columns (kohya/LyCORIS/OneTrainer
# wd_on_output=False).
MagnitudeAxis = Literal["out", "in"]


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
    # modules whose lora_magnitude_vector runs along in_features (read from kohya/LyCORIS dora_scale);
    # a PEFT file has none: its magnitudes are per output feature
    magnitude_axes: dict[str, MagnitudeAxis] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ΔW = s·B·A with s = alpha/r (alpha/sqrt(r) with rsLoRA).

    Shapes: linear A (r, in), B (out, r); conv A (r, in, kh, kw), B (out, r, 1, 1); embedding
    A (r, vocab), B (dim, r), whose ΔW is (B·A)ᵀ of shape (vocab, dim).  ``magnitude`` is DoRA's
    magnitude vector, ``bias`` the ``lora_B.bias`` of ``lora_bias`` adapters.  ``magnitude_axis``:
    "out" (PEFT's: m has one entry per output feature, W' = m / ‖W + ΔW‖_row · (W + ΔW)) or "in"
    (LyCORIS ``wd_on_output=False``: one per input feature (channel), the norm over each column, i.e.
    over every axis but the input one).

    ``parameter``: a PEFT ``target_parameters`` wrapper of a (fused MoE experts) parameter, named by
    the parameter's path.  Per expert e, A[e] (r, in) and B[e] (out, r): A (E, r, in), B (E, out, r),
    ΔW[e] = s·B[e]·A[e], ΔW of shape (E, out, in) in PEFT's orientation of the parameter (a 2-D
    parameter such as a router weight has E = 1).  On disk PEFT stacks them as lora_A (E·r, in) with
    row e·r + j and lora_B (out, r·E) with column j·E + e (:func:`stacked`, :func:`unstacked`).
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool = False
    kind: Kind = "linear"
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude_axis: MagnitudeAxis = "out"

    @property
    def rank(self) -> int:
        return int(self.A.shape[1] if self.kind == "parameter" else self.A.shape[0])

    @property
    def experts(self) -> int:
        """E for a ``parameter`` module, 1 for every other kind."""
        return int(self.A.shape[0]) if self.kind == "parameter" else 1

    @property
    def scale(self) -> float:
        return spec.scaling(self.alpha, self.rank, rslora=self.rslora)

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    def delta_shape(self, *, fan_in_fan_out: bool = False) -> tuple[int, ...]:
        """Shape of ΔW as the base stores the weight (transposed for embeddings and fan_in_fan_out)."""
        if self.kind == "embedding":
            return (int(self.A.shape[1]), int(self.B.shape[0]))
        if self.kind == "parameter":
            return (self.experts, int(self.B.shape[1]), int(self.A.shape[2]))
        if self.kind == "conv":
            return (int(self.B.shape[0]), *(int(d) for d in self.A.shape[1:]))
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if fan_in_fan_out else (out, inp)

    def transposed(self, *, fan_in_fan_out: bool = False) -> bool:
        """Whether the base stores (B·A)ᵀ: embeddings always, linears under ``fan_in_fan_out``."""
        return self.kind == "embedding" or (self.kind == "linear" and fan_in_fan_out)

    def delta(self, *, fan_in_fan_out: bool = False) -> torch.Tensor:
        """Dense ΔW in float32, in the base weight's layout.  Forms an out x in matrix: merge only."""
        if self.kind == "parameter":
            return self.scale * torch.bmm(self.B.float(), self.A.float())
        B, A = flat(self.B.float(), self.A.float())
        dense = self.scale * (B @ A)
        if self.transposed(fan_in_fan_out=fan_in_fan_out):
            return dense.T
        return dense.reshape(self.delta_shape())

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ΔW/s as independent (B, A) blocks: one per expert for a ``parameter`` module, else the one pair.

        Norms, inner products and spectra of ΔW are those of the block-diagonal matrix of the blocks.
        """
        if self.kind == "parameter":
            return [(self.B[e], self.A[e]) for e in range(self.experts)]
        return [(self.B, self.A)]

    @property
    def num_params(self) -> int:
        extra = sum(t.numel() for t in (self.magnitude, self.bias) if t is not None)
        return self.A.numel() + self.B.numel() + extra


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: factors per module, the PEFT config, replaced base tensors, metadata.

    ``config`` is the PEFT ``adapter_config.json`` as read; on save its ``r``, ``lora_alpha``,
    ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` are rewritten to describe
    ``modules`` exactly, and every other field passes through untouched.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values()) + sum(t.numel() for t in self.extra_tensors.values())

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def peft_config(self) -> dict[str, Any]:
        """The config to write: the stored one, with rank/alpha/targets rewritten to fit ``modules``."""
        config = dict(self.config)
        config.setdefault("peft_type", "LORA")
        if not self.modules:
            return config
        if not _describes(config, self.modules):
            config.update(_fitted_fields(self.modules))
        config["use_rslora"] = any(m.rslora for m in self.modules.values())
        config["use_dora"] = any(m.magnitude is not None for m in self.modules.values())
        config["lora_bias"] = any(m.bias is not None for m in self.modules.values())
        return config

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their spec v1 keys, module by module (A, B, bias, magnitude), then extras."""
        out: dict[str, torch.Tensor] = {}
        stored = stored_names(self.modules)
        for name, module in self.modules.items():
            if module.kind == "parameter":
                A, B = stacked(module)
                out[spec.tensor_key(stored[name], "lora_A.weight")] = A
                out[spec.tensor_key(stored[name], "lora_B.weight")] = B
                continue
            a, b = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
            out[spec.tensor_key(name, a)] = module.A
            out[spec.tensor_key(name, b)] = module.B
            if module.bias is not None:
                out[spec.tensor_key(name, "lora_B.bias")] = module.bias
            if module.magnitude is not None:
                out[spec.tensor_key(name, "lora_magnitude_vector")] = module.magnitude
        out.update(self.extra_tensors)
        return out

    def to_raw(self, source: str = "<adapter>") -> RawAdapter:
        """This adapter as the files :func:`save` would write, for validation without a disk trip."""
        axes: dict[str, MagnitudeAxis] = {n: "in" for n, m in self.modules.items() if m.magnitude is not None and m.magnitude_axis == "in"}
        return RawAdapter(source, self.peft_config(), self.state_dict(), self.file_metadata(), magnitude_axes=axes)

    def foreign_metadata(self) -> dict[str, str]:
        """Metadata from the file this adapter was read from that stays true in any output: everything
        but loratools' own keys (recomputed on every write) and foreign scaling descriptions
        (:data:`loratools.spec.SCALING_METADATA`, which arithmetic would falsify), with data hashes
        dropped and network sizes rewritten to these modules (:func:`loratools.metadata.kept`)."""
        foreign = {k: v for k, v in self.metadata.items() if k not in spec.OWN_METADATA and k not in spec.SCALING_METADATA}
        modules = self.modules.values()
        return metadata.kept(
            foreign,
            ranks=[m.rank for m in modules],
            alphas=[m.scale * m.rank for m in modules],
            dora_axes={m.magnitude_axis for m in modules if m.magnitude is not None},
        )

    def file_metadata(self) -> dict[str, str]:
        """safetensors ``__metadata__`` for a spec v1 file: ours plus :meth:`foreign_metadata`."""
        meta = self.foreign_metadata()
        meta[spec.META_FORMAT] = "pt"
        meta[spec.META_VERSION] = spec.SPEC_VERSION
        return meta

    def reweighted(self, factors: Mapping[str, float]) -> Adapter:
        """The same adapter with module ``name``'s ΔW multiplied by ``factors[name]`` (folded into its alpha).

        s = alpha/r (or alpha/√r) is linear in alpha, so the factor reaches every use of ΔW: sums,
        methods, merges and the lora_bias term alike.
        """
        modules = {n: replace(m, alpha=m.alpha * factors[n]) if n in factors else m for n, m in self.modules.items()}
        return replace(self, modules=modules)

    def with_dtype(self, dtype: torch.dtype) -> Adapter:
        """A copy with every floating tensor cast to ``dtype``."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() else t

        modules = {
            n: LoraModule(cast(m.A), cast(m.B), m.alpha, m.rslora, m.kind, cast(m.magnitude), cast(m.bias), m.magnitude_axis)  # type: ignore[arg-type]
            for n, m in self.modules.items()
        }
        extras = {k: cast(t) for k, t in self.extra_tensors.items()}
        return Adapter(modules, dict(self.config), extras, dict(self.metadata))  # type: ignore[arg-type]


def _describes(config: Mapping[str, Any], modules: Mapping[str, LoraModule]) -> bool:
    """Whether ``config``'s r/alpha/patterns/targets resolve to exactly each module's rank and alpha."""
    if not spec.config_problems(config) == []:
        return False
    names = list(modules)
    ranks, alphas = spec.module_ranks(config, names), spec.module_alphas(config, names)
    return all(spec.targeted(config, names)) and all(
        r == m.rank and a == m.alpha for r, a, m in zip(ranks, alphas, modules.values(), strict=True)
    )


def _fitted_fields(modules: Mapping[str, LoraModule]) -> dict[str, Any]:
    """r and lora_alpha from the most common values, exact-name patterns for the rest."""
    r0 = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    a0 = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    anchored = {name: "^" + name.replace(".", r"\.") for name in modules}
    params = sorted(n for n, m in modules.items() if m.kind == "parameter")
    return {
        "target_parameters": params or None,
        "r": r0,
        "lora_alpha": _number(a0),
        "rank_pattern": {anchored[n]: m.rank for n, m in modules.items() if m.rank != r0},
        "alpha_pattern": {anchored[n]: _number(m.alpha) for n, m in modules.items() if m.alpha != a0},
        "target_modules": sorted(n for n, m in modules.items() if m.kind != "parameter"),
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def from_raw(raw: RawAdapter) -> Adapter:
    """Build an :class:`Adapter` from raw files that have passed validation."""
    config = dict(raw.config)
    rslora = bool(config.get("use_rslora", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, Kind] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in raw.tensors.items():
        split = spec.split_key(key)
        if split is None:
            extras[key] = tensor
            continue
        module, suffix = split
        parts.setdefault(module, {})[spec.TENSOR_ROLES[suffix]] = tensor
        if suffix.startswith("lora_embedding"):
            kinds[module] = "embedding"
    modules = {}
    wrapped = spec.wrapped_parameters(config, parts)
    for (name, p), alpha in zip(parts.items(), spec.module_alphas(config, list(parts)), strict=True):
        if name in wrapped:  # rank and alpha patterns match the parameter path, as in PEFT
            path = wrapped[name]
            A, B = unstacked(p["A"], p["B"], spec.module_rank(config, path))
            modules[path] = LoraModule(A, B, spec.module_alpha(config, path), rslora, "parameter")
            continue
        kind = kinds.get(name) or ("conv" if p["A"].dim() > 2 else "linear")
        axis = raw.magnitude_axes.get(name, "out")
        modules[name] = LoraModule(p["A"], p["B"], alpha, rslora, kind, p.get("magnitude"), p.get("bias"), axis)
    return Adapter(modules, config, extras, dict(raw.metadata))


def stacked(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``parameter`` module's factors as PEFT saves them: lora_A (E·r, in), lora_B (out, r·E).

    peft 0.21.2 tuners/lora/layer.py ParamWrapper.get_delta_weight reads them back with
    ``A.reshape(E, r, in)`` and ``B.reshape(out, r, E)``: expert e's B is column j·E + e.
    """
    E, r, inp = module.A.shape
    return module.A.reshape(E * r, inp), module.B.permute(1, 2, 0).reshape(module.B.shape[1], r * E)


def unstacked(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stacked lora_A (E·r, in), lora_B (out, r·E) as per-expert A (E, r, in), B (E, out, r)."""
    E = int(A.shape[0]) // rank
    return A.reshape(E, rank, A.shape[1]), B.reshape(B.shape[0], rank, E).permute(2, 0, 1).contiguous()


def stored_names(modules: Mapping[str, LoraModule]) -> dict[str, str]:
    """The module name PEFT saves each ``parameter`` module under: its owner, plus one ``.base_layer``
    per wrapper around it (later parameters of the owner, :data:`spec.EXPERT_PARAMETER_ORDER`)."""
    owners: dict[str, list[str]] = {}
    for path, m in modules.items():
        if m.kind == "parameter":
            owner, _, param = path.rpartition(".")
            owners.setdefault(owner, []).append(param)
    order = spec.EXPERT_PARAMETER_ORDER
    out = {}
    for owner, params in owners.items():
        ranked = sorted(params, key=lambda p: (order.index(p) if p in order else len(order), p))
        for i, param in enumerate(ranked):
            out[f"{owner}.{param}"] = owner + spec.BASE_LAYER * (len(ranked) - 1 - i)
    return out


def raw_from_modules(modules: dict[str, LoraModule], header: Header, metadata: dict[str, str]) -> RawAdapter:
    """Modules read from a foreign file (kohya, diffusers) as the spec v1 :class:`RawAdapter` they describe.

    The config is fitted to the modules; the file's own header stays attached, so validation still
    checks its ``loratools.sha256`` if it has one.
    """
    raw = Adapter(modules, {}, {}, metadata).to_raw(str(header.path))
    return replace(raw, metadata=metadata, header=header)


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One finite weight per input adapter (all 1 when ``weights`` is None); :class:`ArgumentError` otherwise."""
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ArgumentError(f"got {len(weights)} weight(s) for {n} adapter(s); give exactly one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ArgumentError(f"weight {w!r} is not a finite number")
    return [float(w) for w in weights]
