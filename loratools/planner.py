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
  result depend on the order of the terms;
* full tensors, trainable tokens, tied heads and grown vocabularies follow
  :mod:`loratools.fulltensors` (PEFT's inference semantics; a tied head is untied where needed);
* a quantized base parameter takes ΔW only through the codec that claims it
  (:mod:`loratools.io.quant`), recorded per edit; one that looks quantized (a quantized dtype, a
  scale companion) that no codec claims is refused by name, and no full tensor replaces a quantized one.

Only headers are read: a plan for a 140 GB base costs kilobytes of I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import fulltensors as full
from . import spec, variants
from .adapter import Adapter, LoraModule
from .errors import Problem
from .io.checkpoint import Checkpoint, ModuleIndex, module_index
from .io.layouts import Layout, Piece, expert_pieces, layout_of, weight_key
from .io.quant.registry import QuantMap, reader, scan
from .io.tensorfile import TensorInfo
from .orientation import orientations, variant_problems

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Problems that are conflicts between inputs rather than misfits with the base.
CONFLICTS = frozenset({"dora-shared-tensor", "saved-conflict", "saved-weighted", "tokens-overlap", "tokens-replaced", "residual-shared"})
# Problems that say no exact merge exists for the adapter at all (see variant_problems).
VARIANTS = frozenset({"residual-init", "alora-unmergeable", "layer-replication", "fan-in-fan-out-undecidable"})


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
    residual: str | None = None  # "pissa"/"olora": the base first loses what that init moved into the adapter


@dataclass(frozen=True)
class Residual:
    """What a PiSSA/OLoRA init moved out of a base weight, to take away before ΔW is added.

    ``family``: ``pissa`` (the top-``rank`` SVD part) or ``olora`` (``scale``·Q_r·R_r);
    ``transposed``: the base stores the weight transposed (``fan_in_fan_out``).
    """

    family: str
    rank: int
    scale: float
    transposed: bool


@dataclass(frozen=True)
class TensorEdit:
    """Everything that changes one base tensor: LoRA terms, a DoRA magnitude, a full replacement, replaced rows.

    ``source``: the base tensor read for this output when it is not ``key`` itself (an untied
    ``lm_head.weight`` is written from ``embed_tokens.weight``).  ``shape``: the output shape when
    the adapter grows the vocabulary (the replacement then gives every row).  Order: the
    replacement (or base), then ``tokens``' rows, then the LoRA terms, then DoRA.
    """

    key: str
    terms: tuple[Term, ...] = ()
    magnitude: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    tokens: full.Tokens | None = None
    source: str | None = None
    shape: tuple[int, ...] | None = None
    residual: Residual | None = None
    codec: str | None = None  # the quantization codec that stores this tensor (io.quant), None for a float one


@dataclass(frozen=True)
class Plan:
    """The edits per base tensor key, and every problem found (the plan may run only when there are none)."""

    edits: dict[str, TensorEdit]
    problems: list[Problem]
    config: dict[str, Any] = field(default_factory=dict)  # config.json fields the output sets (tie_word_embeddings, vocab_size)
    quant: QuantMap = field(default_factory=QuantMap)  # the base's quantized parameters and what no codec handles

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings, e.g. an overridden fan_in_fan_out, do not stop a merge)."""
        return not self.errors


def plan(
    checkpoint: Checkpoint, adapters: Sequence[Adapter], *, weights: Sequence[float] | None = None, labels: Sequence[str] | None = None
) -> Plan:
    """Map ``adapters`` (weighted by ``weights``, default 1) onto ``checkpoint``; never raises for a misfit.

    ``labels`` name the adapters in problem locations when there are several.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    model_config = checkpoint.model_config()
    quant = scan(model_config, checkpoint.tensors, reader(checkpoint))
    tied = full.tying(checkpoint, checkpoint.tensors)
    tensors = {**full.with_head(checkpoint.tensors, tied), **quant.logical(checkpoint.tensors)}
    vocab = full.vocab_keys(tensors, tied)
    index = module_index(tensors)
    grown = _grown(adapters, tensors, index, vocab)
    layout = layout_of(checkpoint.root, list(tensors))
    terms: dict[str, list[Term]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    owners: dict[str, int] = {}
    tokens: dict[str, list[full.Tokens]] = {}
    problems: list[Problem] = []
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        label = f"{labels[i]}: " if labels is not None and len(adapters) > 1 else ""
        refused = variant_problems(adapter, label)
        problems += refused
        if any(p.severity == "error" for p in refused):  # the modules do not mean W + ΔW on this base: plan nothing of it
            continue
        matched = {
            name: key
            for name, m in adapter.modules.items()
            if m.kind != "parameter" and (key := weight_key(name, index, layout)) is not None
        }
        layouts, layout_problems = orientations(adapter, {n: tensors[k] for n, k in matched.items()}, model_config, label)
        problems += layout_problems
        for name, module in adapter.modules.items():
            where = f"{label}{spec.PREFIX}{name}"
            if module.kind == "parameter":
                expert_terms = _parameter_terms(i, name, module, weight, tensors, index, layout, where, quant)
                if isinstance(expert_terms, Problem):
                    problems.append(expert_terms)
                for term_key, term in expert_terms if isinstance(expert_terms, list) else ():
                    terms.setdefault(term_key, []).append(term)
                continue
            key = matched.get(name)
            if key is None:
                problems.append(
                    Problem("base-unmatched", where, f"no base tensor matches (looked for {name}.weight, with and without prefixes)")
                )
                continue
            if name not in layouts:
                continue  # orientations() reported why
            transposed = layouts[name]
            problem = _fit(module, transposed, tensors[key], where, grown.get(key), quant)
            if problem is not None:
                problems.append(problem)
                continue
            residual = variants.rebuilt_init(adapter.config)
            if residual is not None and (module.kind != "linear" or module.magnitude is not None or (residual == "olora" and transposed)):
                message = (
                    f"a {residual} init is rebuilt for plain linear layers only (PEFT's {residual}_init), not for this {module.kind} module"
                )
                problems.append(Problem("residual-init", where, message))
                continue
            terms.setdefault(key, []).append(Term(i, name, module, weight, transposed, residual=residual))
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
        for key, tensor in full.saved_tensors(adapter.extra_tensors).items():
            target = replaced_key(key.removesuffix(full.TOKENS_SUFFIX) + ".weight" if full.is_tokens(key) else key, tensors, index, layout)
            if target is None:
                message = f"saved tensor {list(tensor.shape)} would replace a base tensor, but no base tensor matches"
                problems.append(Problem("tokens-unmatched" if full.is_tokens(key) else "saved-unmatched", f"{label}{key}", message))
            elif target in quant.params or target in quant.unhandled:
                what = quant.params[target].label if target in quant.params else quant.unhandled[target]
                message = (
                    f"saved tensor would replace base tensor {target}, which is quantized ({what}); full tensors replace float weights only"
                )
                problems.append(Problem("base-quant-unsupported", f"{label}{key}", message))
            elif full.is_tokens(key):
                indices = full.token_indices(adapter.config, key)
                found = full.token_problems(tensor, indices, tensors[target], f"{label}{key}", weight)
                problems += found
                if not found and indices is not None:
                    tokens.setdefault(target, []).append(full.Tokens(tuple(indices), tensor))
            else:
                found = full.full_problems(key, tensor, target, tensors[target], weight, f"{label}{key}", vocab)
                if not found and target in replacements and not _equal(replacements[target], tensor):
                    message = (
                        f"adapters {owners[target] + 1} and {i + 1} hold different full copies of {target}; "
                        "a full tensor replaces the base, so the result would depend on the order: merge one of them"
                    )
                    found.append(Problem("saved-conflict", f"{label}{key}", message))
                problems += found
                if not found:
                    replacements[target] = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
                    owners.setdefault(target, i)
    for key in sorted(k for k in magnitudes if len(terms[k]) > 1):
        names = ", ".join(sorted({t.module for t in terms[key]}))
        message = (
            f"DoRA module shares base tensor {key} with other terms ({names}); DoRA renormalises the whole row, "
            "so the result would depend on merge order: merge them one at a time"
        )
        problems.append(Problem("dora-shared-tensor", key, message))
    merged_tokens: dict[str, full.Tokens] = {}
    for key, parts in tokens.items():
        one, found = full.merge_tokens(parts, key)
        problems += found
        if one is not None:
            merged_tokens[key] = one
    keys = terms.keys() | replacements.keys() | merged_tokens.keys()
    residuals, found = _residuals(terms)
    problems += found
    edits = {
        k: TensorEdit(
            k,
            tuple(terms.get(k, ())),
            magnitudes.get(k),
            replacements.get(k),
            merged_tokens.get(k),
            None,
            grown.get(k),
            residuals.get(k),
            quant.params[k].codec if k in quant.params else None,
        )
        for k in keys
    }
    config = full.resolve_tied(edits, tied, lambda key: TensorEdit(key))
    problems += full.mixed_problems(edits)
    found, sizes = full.vocab_problems(edits, checkpoint.tensors, tensors, vocab)
    return Plan(edits, problems + found, {**config, **sizes}, quant)


def _residuals(terms: dict[str, list[Term]]) -> tuple[dict[str, Residual], list[Problem]]:
    """The residual each base tensor loses before its terms apply; a tensor with a residual takes no other term.

    PEFT rebuilds one residual per adapter layer on load, so a second adapter on the same tensor
    would see another base: no exact result.
    """
    residuals: dict[str, Residual] = {}
    problems = []
    for key, found in terms.items():
        own = [t for t in found if t.residual is not None]
        if not own:
            continue
        if len(found) > 1:
            message = f"{own[0].residual} module {own[0].module} rebuilds the residual of {key}, which other terms also change"
            problems.append(Problem("residual-shared", key, message + "; merge that adapter alone"))
            continue
        t = own[0]
        residuals[key] = Residual(str(t.residual), t.lora.rank, t.lora.scale, t.transposed)
    return residuals, problems


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and torch.equal(a.reshape(-1), b.reshape(-1).to(a.dtype))


def _grown(adapters: Sequence[Adapter], tensors: dict[str, TensorInfo], index: ModuleIndex, vocab: set[str]) -> dict[str, tuple[int, ...]]:
    """The output shape of each vocabulary tensor a full tensor grows (an adapter trained after resize_token_embeddings)."""
    grown: dict[str, tuple[int, ...]] = {}
    for adapter in adapters:
        for key, tensor in full.saved_tensors(adapter.extra_tensors).items():
            target = None if full.is_tokens(key) else replaced_key(key, tensors, index)
            if target in vocab and target is not None and tuple(tensor.shape[1:]) == tensors[target].shape[1:]:
                if tensor.shape[0] > tensors[target].shape[0]:
                    grown[target] = max(grown.get(target, ()), tuple(tensor.shape))
    return grown


def _fit(
    module: LoraModule, transposed: bool, info: TensorInfo, where: str, grown: tuple[int, ...] | None, quant: QuantMap
) -> Problem | None:
    """Why ``module``'s ΔW (stored transposed when ``transposed``) cannot be added to base tensor ``info``
    (of shape ``grown`` when the adapter grows it), or None."""
    refused = quant.refusal(info.name)
    if refused is not None:
        return Problem(refused.code, where, refused.message)
    want = module.delta_shape(fan_in_fan_out=transposed and module.kind == "linear")
    if (grown or info.shape) != want:
        return Problem("base-shape-mismatch", where, f"ΔW has shape {list(want)} but base tensor {info.name} is {list(info.shape)}")
    if info.name in quant.params and grown is not None:
        return Problem("base-quant-unsupported", where, f"base tensor {info.name} is quantized; its vocabulary cannot grow")
    if info.dtype not in FLOAT_DTYPES and info.name not in quant.params:
        return Problem(
            "base-dtype-unsupported",
            where,
            f"base tensor {info.name} is stored as {info.dtype}; ΔW can only be added to {', '.join(FLOAT_DTYPES)} weights",
        )
    return None


def replaced_key(key: str, tensors: dict[str, TensorInfo], index: ModuleIndex, layout: Layout | None = None) -> str | None:
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
    index: ModuleIndex,
    layout: Layout,
    where: str,
    quant: QuantMap,
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
        refused = quant.refusal(piece.key)
        if refused is not None:
            return Problem(refused.code, where, refused.message)
        if info.dtype not in FLOAT_DTYPES and piece.key not in quant.params:
            return Problem("base-dtype-unsupported", where, f"base tensor {piece.key} is stored as {info.dtype}; ΔW needs a float weight")
        found.append((piece.key, term))
    return found
