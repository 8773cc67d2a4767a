"""Adapter arithmetic in factored form: add, scale, subtract and SVD resize, never forming ΔW.

Every function returns a new :class:`~loratools.adapter.Adapter` whose modules have scale 1
(``lora_alpha = r``, no rsLoRA): each input's s = alpha/r (or alpha/sqrt(r)) and weight are folded
into the factors, split as sqrt(|c|) into A and sign(c)·sqrt(|c|) into B so neither factor's norm
drifts.  Sums are exact because factors are concatenated: [√c₁B₁ | √c₂B₂]·[√c₁A₁; √c₂A₂] = c₁B₁A₁ + c₂B₂A₂
(PEFT's "linear" combination multiplies the summed A's by the summed B's, which adds cross terms Bᵢ·Aⱼ).
Resizing truncates the SVD of s·B·A computed from the factors (:mod:`loratools.linalg`), which by
Eckart–Young is the best rank-k approximation in Frobenius norm.

Math runs in float32 (float64 for the r x r cores); outputs keep each input module's dtype unless
``dtype`` is given.  DoRA adapters are refused: their magnitude step renormalises W + ΔW row by row,
so it is not linear in ΔW and neither sums nor truncations of ΔW carry over.

``modules_to_save`` tensors and trainable-token rows replace base weights rather than add to them
(:mod:`loratools.fulltensors`), so they cannot be summed or scaled: they pass through unchanged under
weight 1, any other weight on an adapter holding them is refused (``scale(A, -1)`` would otherwise
keep A's head, so base + A + scale(A, -1) would not be the base), and adding adapters whose copies of
the same tensor differ is an error, as a merge of them is.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .. import variants
from ..adapter import Adapter, LoraModule, check_weights
from ..compute import per_item
from ..errors import ArgumentError, ShapeError, SpecError
from ..fulltensors import has_full_tensors, is_tokens
from ..io.tensorfile import DtypeLike, torch_dtype
from ..linalg import CRITERIA, choose_rank, factored_svd, flat, kept_energy, tail_errors

# Config fields an output rewrites from its modules (via Adapter.peft_config); the layer filters go
# because target_modules becomes the exact module list.
_REWRITTEN = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "use_rslora",
    "use_dora",
)


# Config fields that change what ΔW means at inference and pass through to the output unchanged.
_CARRIED = ("alora_invocation_tokens", "layer_replication")


@dataclass(frozen=True)
class ResizeRow:
    """How :func:`resize` treated one module: ranks before/after, kept fraction of ‖ΔW‖_F², ‖ΔW−ΔW_k‖_F/‖ΔW‖_F."""

    module: str
    old_rank: int
    new_rank: int
    kept_energy: float
    rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add(*adapters: Adapter, weights: Sequence[float] | None = None, dtype: DtypeLike = None) -> Adapter:
    """ΔW = Σ wᵢ·ΔWᵢ exactly, module by module, for the union of the inputs' modules.

    The result's rank per module is the sum of the input ranks holding it; different ranks, alphas,
    rsLoRA and patterns all mix.  Raises :class:`ShapeError` naming a module whose ΔW shapes
    differ between inputs, :class:`ArgumentError` if ``weights`` does not give one number per input.
    """
    if not adapters:
        raise ArgumentError("add needs at least one adapter")
    weights = check_weights(weights, len(adapters))
    cast = torch_dtype(dtype)
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True), 1):
        refuse_uncombinable(adapter, weight, f"input {i}")
    check_variants_agree(adapters)
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        raise SpecError("inputs disagree on fan_in_fan_out, so they were made for differently laid-out bases")
    names = list(dict.fromkeys(name for a in adapters for name in a.modules))
    modules = {}
    for name in names:
        terms = [(i, a.modules[name], w) for i, (a, w) in enumerate(zip(adapters, weights, strict=True), 1) if name in a.modules]
        check_shapes(name, [(i, m) for i, m, _ in terms])
        parts = [_fold(m, w * m.scale) for _, m, w in terms]
        biases = [bias for _, _, bias in parts if bias is not None]
        like = terms[0][1]
        modules[name] = rebuild(
            like,
            torch.cat([B for B, _, _ in parts], -1),  # rank is B's last and A's second-to-last dim, per expert too
            torch.cat([A for _, A, _ in parts], -2),
            torch.stack(biases).sum(0) if biases else None,
            cast or like.dtype,
        )
    return derive(adapters, modules)


def scale(adapter: Adapter, factor: float, *, dtype: DtypeLike = None) -> Adapter:
    """ΔW → factor·ΔW for every module (negative factors flip the adapter); ranks are unchanged."""
    return add(adapter, weights=[factor], dtype=dtype)


def subtract(a: Adapter, b: Adapter, *, dtype: DtypeLike = None) -> Adapter:
    """ΔW = ΔW_a − ΔW_b exactly (rank r_a + r_b where both hold a module)."""
    return add(a, b, weights=[1.0, -1.0], dtype=dtype)


def resize(
    adapter: Adapter,
    rank: int | None = None,
    *,
    energy: float | None = None,
    max_rel_error: float | None = None,
    sv_ratio: float | None = None,
    dtype: DtypeLike = None,
) -> tuple[Adapter, list[ResizeRow]]:
    """Truncate every module's ΔW = s·B·A to its best rank-k approximation; exactly one criterion.

    ``rank``: k = min(rank, r) for every module.  Per-module dynamic k, the smallest that meets:
    ``energy`` (kept fraction of ‖ΔW‖_F², in (0, 1]), ``max_rel_error`` (‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= bound,
    in [0, 1)), ``sv_ratio`` (keep σᵢ >= σ₁/ratio, ratio >= 1).  New factors are B = U_k·√σ, A = √σ·V_kᵀ.
    Returns the new adapter and one :class:`ResizeRow` per module.  Modules run in parallel, one
    single-threaded worker per torch thread (:func:`loratools.compute.per_item`).
    """
    criterion, value = check_criterion(rank=rank, energy=energy, max_rel_error=max_rel_error, sv_ratio=sv_ratio)
    _refuse_dora(adapter, "the adapter")
    _refuse_residual(adapter, "the adapter")
    cast = torch_dtype(dtype)

    def one(item: tuple[str, LoraModule]) -> tuple[LoraModule, ResizeRow]:
        name, m = item
        if m.kind == "parameter":
            return _resize_experts(name, m, criterion, value, cast or m.dtype)
        svd = factored_svd(m.B, m.A, m.scale)
        k = choose_rank(svd.S, criterion, value)
        B, A = svd.factors(k)
        bias = None if m.bias is None else m.bias.float() * m.scale
        row = ResizeRow(name, m.rank, k, float(kept_energy(svd.S)[k - 1]), float(tail_errors(svd.S)[k - 1]))
        return rebuild(m, B, A, bias, cast or m.dtype), row

    done = per_item(one, list(adapter.modules.items()))
    modules = {row.module: module for module, row in done}
    return derive([adapter], modules), [row for _, row in done]


def _resize_experts(name: str, m: LoraModule, criterion: str, value: float, dtype: torch.dtype) -> tuple[LoraModule, ResizeRow]:
    """Resize a ``parameter`` module expert by expert, to one rank k for all (PEFT stores one r per parameter).

    k is the largest rank any expert needs to meet the criterion, so every expert meets it; the row
    reports the worst expert's kept energy and relative error at k.
    """
    svds = [factored_svd(m.B[e], m.A[e], m.scale) for e in range(m.experts)]
    k = max(choose_rank(svd.S, criterion, value) for svd in svds)
    pairs = [_padded(*svd.factors(k), k) for svd in svds]
    B, A = torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs])
    energy = min(float(kept_energy(svd.S)[k - 1]) for svd in svds)
    error = max(float(tail_errors(svd.S)[k - 1]) for svd in svds)
    return rebuild(m, B, A, None, dtype), ResizeRow(name, m.rank, k, energy, error)


def _padded(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors with zero columns/rows added where an expert's ΔW has fewer than k singular values."""
    short = k - int(B.shape[1])
    if short <= 0:
        return B, A
    return torch.cat([B, B.new_zeros(B.shape[0], short)], 1), torch.cat([A, A.new_zeros(short, A.shape[1])], 0)


def check_criterion(**given: float | None) -> tuple[str, float]:
    """The one resize criterion given, checked: (name, value)."""
    chosen = [(name, value) for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        names = ", ".join(CRITERIA)
        raise ArgumentError(f"give exactly one of {names} (got {', '.join(n for n, _ in chosen) or 'none'})")
    name, value = chosen[0]
    if name == "rank":
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise ArgumentError(f"rank must be an integer >= 1, got {value!r}") from None
        ok = value >= 1
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and {"energy": 0 < value <= 1, "max_rel_error": 0 <= value < 1, "sv_ratio": value >= 1}[name]
    if not ok:
        need = {"rank": "an integer >= 1", "energy": "in (0, 1]", "max_rel_error": "in [0, 1)", "sv_ratio": "a number >= 1"}[name]
        raise ArgumentError(f"{name} must be {need}, got {value!r}")
    return name, float(value)


def refuse_uncombinable(adapter: Adapter, weight: float, which: str) -> None:
    """The input checks every combination shares: no DoRA, no unconverted residual init, full tensors only under weight 1."""
    _refuse_dora(adapter, which)
    _refuse_residual(adapter, which)
    _refuse_weighted_full(adapter, weight, which)


def _refuse_dora(adapter: Adapter, which: str) -> None:
    dora = [name for name, m in adapter.modules.items() if m.magnitude is not None]
    if dora:
        raise SpecError(
            f"{which} is a DoRA adapter (lora_magnitude_vector on {dora[0]}); DoRA rescales W + ΔW row by row, "
            "which is not linear in ΔW, so it cannot be added, scaled or resized in factored form",
        )


def _refuse_residual(adapter: Adapter, which: str) -> None:
    """PiSSA/OLoRA/CorDA/LoftQ saved unconverted: PEFT rebuilds the base from r and alpha on load, so new factors mean another model."""
    for code, _, why in variants.variant_problems(adapter.config):
        if code == "residual-init":
            raise SpecError(f"{which} cannot be combined or resized in factored form: {why}", code=code)


def check_variants_agree(adapters: Sequence[Adapter]) -> None:
    """aLoRA's invocation tokens and layer_replication pass through to the output, so every input must hold the same ones.

    ΔW sums and scales are exact under both (aLoRA gates all of ΔW by the same token positions;
    replicated layers keep their indices); mixing values would apply one input's ΔW under another's rule.
    """
    for field in _CARRIED:
        values = [a.config.get(field) or None for a in adapters]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"input {i}: {v!r}" for i, v in enumerate(values, 1))
            raise SpecError(f"inputs disagree on {field} ({shown}); the output can carry only one, so the sum would mean another model")


def _refuse_weighted_full(adapter: Adapter, weight: float, which: str) -> None:
    """Full tensors replace the base: only weight 1 keeps their meaning (as in :func:`loratools.merge`)."""
    if weight != 1.0 and has_full_tensors(adapter):
        saved = [k for k in adapter.extra_tensors if ".base_layer." not in k]
        raise SpecError(
            f"{which} holds full tensors ({', '.join(saved[:2])}{', ...' if len(saved) > 2 else ''}: modules_to_save or "
            f"trainable tokens), which replace base weights; weight {weight:g} has no exact meaning for them: "
            "scale only adapters without full tensors, or drop them first",
        )


def check_shapes(name: str, modules: list[tuple[int, LoraModule]]) -> None:
    """Every input holding ``name`` must have the same kind and ΔW shape."""
    first_i, first = modules[0]
    want = (first.kind, first.delta_shape())
    for i, m in modules[1:]:
        got = (m.kind, m.delta_shape())
        if got != want:
            raise ShapeError(
                f"input {first_i} has a {want[0]} ΔW of shape {_shape(first)} but input {i} has a {got[0]} ΔW of shape {_shape(m)}; "
                "adapters can only be combined module by module for the same base",
                key=name,
            )


def _shape(m: LoraModule) -> str:
    dims = m.delta_shape() if m.kind == "parameter" else (m.B.shape[0], *m.A.shape[1:])
    return " x ".join(str(d) for d in dims)


def _fold(m: LoraModule, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat factors (B, A) with c = weight·scale split as sign(c)·√|c| into B and √|c| into A; bias·c."""
    B, A = (m.B, m.A) if m.kind == "parameter" else flat(m.B, m.A)
    dtype = torch.float64 if B.dtype == torch.float64 else torch.float32
    root = math.sqrt(abs(c))
    bias = None if m.bias is None else m.bias.to(dtype) * c
    return B.to(dtype) * math.copysign(root, c), A.to(dtype) * root, bias


def rebuild(like: LoraModule, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> LoraModule:
    """A scale-1 module (alpha = r, no rsLoRA) from flat factors, reshaped back to ``like``'s layout."""
    k = int(A.shape[-2])
    if like.kind == "conv":
        A = A.reshape(k, *like.A.shape[1:])
        B = B.reshape(B.shape[0], k, *like.B.shape[2:])
    cast = None if bias is None else bias.to(dtype)
    return LoraModule(A.to(dtype).contiguous(), B.to(dtype).contiguous(), float(k), False, like.kind, None, cast)


def derive(inputs: Sequence[Adapter], modules: dict[str, LoraModule]) -> Adapter:
    """The output adapter: the first input's config and metadata, rank/alpha/targets refit to ``modules``."""
    first = inputs[0]
    config = {k: v for k, v in first.config.items() if k not in _REWRITTEN}
    extras = _merged_extras(inputs)
    saved = list(dict.fromkeys(s for a in inputs for s in a.config.get("modules_to_save") or []))
    if saved:
        config["modules_to_save"] = saved
    config.update(_token_fields(inputs))
    draft = Adapter(modules, config, extras, dict(first.metadata))
    return replace(draft, config=draft.peft_config())


def _token_fields(inputs: Sequence[Adapter]) -> dict[str, Any]:
    """``trainable_token_indices`` (and ``ensure_weight_tying``) of the inputs that hold trainable tokens; they must agree."""
    holders = [a for a in inputs if any(is_tokens(k) for k in a.extra_tensors)]
    fields: dict[str, Any] = {}
    for name in ("trainable_token_indices", "ensure_weight_tying"):
        values = [a.config[name] for a in holders if a.config.get(name) is not None]
        if any(v != values[0] for v in values):
            raise SpecError(f"inputs disagree on {name} ({values[0]!r} vs ...); their trainable tokens cannot be combined")
        if values:
            fields[name] = values[0]
    return fields


def _merged_extras(inputs: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Union of the inputs' non-LoRA tensors; the same key holding different values is an error."""
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for i, adapter in enumerate(inputs, 1):
        for key, tensor in adapter.extra_tensors.items():
            if key in merged and not (merged[key].shape == tensor.shape and torch.equal(merged[key], tensor.to(merged[key].dtype))):
                raise SpecError(
                    f"inputs {owner[key]} and {i} hold different copies of this full tensor (modules_to_save); "
                    "full weights replace the base rather than add to it, so they cannot be combined",
                    key=key,
                )
            merged.setdefault(key, tensor)
            owner.setdefault(key, i)
    return merged
