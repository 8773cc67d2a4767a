"""The one planner: how adapters map onto a base checkpoint, tensor by tensor, or every reason they do not.

``validate --base`` reports this planner's problems and ``merge``/``unmerge`` execute its plan, so
``validate ADAPTER --base BASE`` passes exactly when ``merge BASE ADAPTER`` can run.  The rules,
one home each:

* each LoRA module maps to the base's ``<module>.weight`` (prefixes tolerated either way, see
  :func:`loratools.io.checkpoint.find_weight`), whose shape must be ΔW's as the base stores it
  (transposed for embeddings and ``fan_in_fan_out``) and whose dtype must be a float one;
* a ``lora_B.bias`` needs the base bias of the same module and shape;
* each full tensor (``modules_to_save``, saved ``base_layer`` weights) replaces a base tensor of
  its shape;
* a DoRA module's tensor may be touched by nothing else, since its renormalisation would make the
  result depend on the order of the terms.

Only headers are read: a plan for a 140 GB base costs kilobytes of I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import spec
from .adapter import Adapter, LoraModule
from .errors import Problem
from .io.checkpoint import Checkpoint, module_index
from .io.layouts import Layout, Piece, expert_pieces, layout_of, weight_key
from .io.tensorfile import TensorInfo

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Problems that are conflicts between inputs rather than misfits with the base.
CONFLICTS = frozenset({"dora-shared-tensor"})


@dataclass(frozen=True)
class Term:
    """One module's contribution ``weight·s·B·A`` to one base tensor (or ``weight·s·b`` to a bias).

    ``transposed``: the base stores (B·A)ᵀ.  ``bias``: set for a term that adds the module's
    ``lora_B.bias`` (this tensor) to a base bias instead.
    """

    adapter: int
    module: str
    lora: LoraModule
    weight: float
    transposed: bool
    bias: torch.Tensor | None = None
    rounded: bool = False  # ΔW is rounded to the stored dtype before it is added (PEFT's ParamWrapper.merge)


@dataclass(frozen=True)
class TensorEdit:
    """Everything that changes one base tensor: LoRA terms, a DoRA magnitude, a full replacement."""

    key: str
    terms: tuple[Term, ...] = ()
    magnitude: torch.Tensor | None = None
    replacement: torch.Tensor | None = None


@dataclass(frozen=True)
class Plan:
    """The edits per base tensor key, and every problem found (the plan may run only when there are none)."""

    edits: dict[str, TensorEdit]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def plan(
    checkpoint: Checkpoint, adapters: Sequence[Adapter], *, weights: Sequence[float] | None = None, labels: Sequence[str] | None = None
) -> Plan:
    """Map ``adapters`` (weighted by ``weights``, default 1) onto ``checkpoint``; never raises for a misfit.

    ``labels`` name the adapters in problem locations when there are several.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    tensors = checkpoint.tensors
    index = module_index(list(tensors))
    layout = layout_of(checkpoint.root, list(tensors))
    terms: dict[str, list[Term]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    problems: list[Problem] = []
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        label = f"{labels[i]}: " if labels is not None and len(adapters) > 1 else ""
        for name, module in adapter.modules.items():
            where = f"{label}{spec.PREFIX}{name}"
            if module.kind == "parameter":
                found = _parameter_terms(i, name, module, weight, tensors, index, layout, where)
                if isinstance(found, Problem):
                    problems.append(found)
                for term_key, term in found if isinstance(found, list) else ():
                    terms.setdefault(term_key, []).append(term)
                continue
            key = weight_key(name, index, layout)
            if key is None:
                problems.append(
                    Problem("base-unmatched", where, f"no base tensor matches (looked for {name}.weight, with and without prefixes)")
                )
                continue
            problem = _fit(module, adapter.fan_in_fan_out, tensors[key], where)
            if problem is not None:
                problems.append(problem)
                continue
            transposed = module.transposed(fan_in_fan_out=adapter.fan_in_fan_out)
            terms.setdefault(key, []).append(Term(i, name, module, weight, transposed))
            if module.magnitude is not None:
                magnitudes[key] = module.magnitude.reshape(-1).float()
            if module.bias is not None:
                bias_key = key.removesuffix("weight") + "bias"
                if bias_key not in tensors or tensors[bias_key].shape != tuple(module.bias.shape):
                    message = (
                        f"has lora_B.bias {list(module.bias.shape)} but the base has no {bias_key} of that shape to add it to "
                        "(PEFT refuses to merge it too)"
                    )
                    problems.append(Problem("base-bias-unmatched", f"{where}.lora_B.bias", message))
                    continue
                terms.setdefault(bias_key, []).append(Term(i, name, module, weight, False, bias=module.bias))
        for key, tensor in adapter.extra_tensors.items():
            target = replaced_key(key, tensors, index, layout)
            if target is None:
                message = f"saved tensor {list(tensor.shape)} would replace a base tensor, but no base tensor matches"
                problems.append(Problem("saved-unmatched", f"{label}{key}", message))
            elif tensors[target].shape != tuple(tensor.shape):
                message = f"saved tensor {list(tensor.shape)} would replace base tensor {target}, which is {list(tensors[target].shape)}"
                problems.append(Problem("saved-shape-mismatch", f"{label}{key}", message))
            else:
                replacements[target] = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
    for key in sorted(k for k in magnitudes if len(terms[k]) > 1):
        names = ", ".join(sorted({t.module for t in terms[key]}))
        message = (
            f"DoRA module shares base tensor {key} with other terms ({names}); DoRA renormalises the whole row, "
            "so the result would depend on merge order: merge them one at a time"
        )
        problems.append(Problem("dora-shared-tensor", key, message))
    keys = terms.keys() | replacements.keys()
    edits = {k: TensorEdit(k, tuple(terms.get(k, ())), magnitudes.get(k), replacements.get(k)) for k in keys}
    return Plan(edits, problems)


def _fit(module: LoraModule, fan_in_fan_out: bool, info: TensorInfo, where: str) -> Problem | None:
    """Why ``module``'s ΔW cannot be added to base tensor ``info``, or None."""
    want = module.delta_shape(fan_in_fan_out=fan_in_fan_out)
    if info.shape != want:
        return Problem("base-shape-mismatch", where, f"ΔW has shape {list(want)} but base tensor {info.name} is {list(info.shape)}")
    if info.dtype not in FLOAT_DTYPES:
        return Problem(
            "base-dtype-unsupported",
            where,
            f"base tensor {info.name} is stored as {info.dtype}; ΔW can only be added to {', '.join(FLOAT_DTYPES)} weights",
        )
    return None


def replaced_key(key: str, tensors: dict[str, TensorInfo], index: dict[str, str], layout: Layout | None = None) -> str | None:
    """The base tensor a saved full tensor replaces: ``base_model.model.lm_head.weight`` -> ``lm_head.weight``."""
    name = key.removeprefix(spec.PREFIX).replace(".base_layer.", ".")
    if name in tensors:
        return name
    module, _, param = name.rpartition(".")
    weight = weight_key(module, index, layout or Layout(None))
    candidate = weight.removesuffix("weight") + param if weight is not None else None
    return candidate if candidate in tensors else None


def _parameter_terms(
    i: int,
    path: str,
    module: LoraModule,
    weight: float,
    tensors: dict[str, TensorInfo],
    index: dict[str, str],
    layout: Layout,
    where: str,
) -> list[tuple[str, Term]] | Problem:
    """The terms of a ``target_parameters`` module (fused experts, a router weight), or why it does not fit.

    ΔW[e] = s·B[e]·A[e] (E, out, in) is PEFT's view of the parameter (peft 0.21.2 tuners/lora/layer.py
    ParamWrapper.get_delta_weight).  It lands on one fused base tensor (E, out, in), or (E, in, out)
    for transposed expert modules (gpt-oss), or per expert on the slices of ``experts.<e>.<name>.weight``
    transformers fuses it from (:func:`loratools.io.layouts.expert_pieces`).  A 2-D parameter (E = 1)
    is an ordinary weight.  PEFT's merge rounds ΔW to the parameter's dtype before adding it, and so
    do these terms.
    """
    E, out, inp = module.delta_shape()
    owner, _, param = path.rpartition(".")
    if param == "weight":
        key = weight_key(owner, index, layout)
        pieces: list[Piece] | str = [Piece(key, None, (0, 0))] if key is not None else f"no base tensor matches {path}"
    else:
        pieces = expert_pieces(path, E, tensors, index, layout)
    if isinstance(pieces, str):
        return Problem("base-unmatched", where, pieces)
    ends = {p.expert: p.rows[1] for p in pieces if p.expert is not None}  # pieces come in row order
    short = [e for e, end in ends.items() if end != out]
    if short:
        names = ", ".join(p.key for p in pieces if p.expert == short[0])
        return Problem("base-shape-mismatch", where, f"ΔW[{short[0]}] has {out} rows but {names} hold {ends[short[0]]}")
    found = []
    for piece in pieces:
        info = tensors[piece.key]
        if piece.expert is None and layout.model_type is None and len(info.shape) == 3 and out == inp:
            message = (
                f"base tensor {piece.key} is square per expert and the base has no config.json model_type, so whether it "
                "stores ΔW[e] or ΔW[e]ᵀ (gpt-oss) cannot be told; put the model's config.json beside the checkpoint"
            )
            return Problem("base-layout-ambiguous", where, message)
        if piece.expert is None:
            flat2d = len(info.shape) == 2 and E == 1
            want = (out, inp) if flat2d else ((E, inp, out) if layout.transposed_experts else (E, out, inp))
            lora = LoraModule(module.A[0], module.B[0], module.alpha, module.rslora) if flat2d else module
            term = Term(i, path, lora, weight, layout.transposed_experts and not flat2d, rounded=True)
        else:
            r0, r1 = piece.rows
            want = (r1 - r0, inp)
            lora = LoraModule(module.A[piece.expert], module.B[piece.expert, r0:r1], module.alpha, module.rslora)
            term = Term(i, path, lora, weight, False, rounded=True)
        if info.shape != want:
            what = f"expert {piece.expert} rows {piece.rows[0]}:{piece.rows[1]} of " if piece.expert is not None else ""
            delta = list(module.delta_shape())
            message = f"{what}ΔW {delta} needs base tensor {piece.key} of shape {list(want)}, but it is {list(info.shape)}"
            return Problem("base-shape-mismatch", where, message)
        if info.dtype not in FLOAT_DTYPES:
            return Problem("base-dtype-unsupported", where, f"base tensor {piece.key} is stored as {info.dtype}; ΔW needs a float weight")
        found.append((piece.key, term))
    return found
