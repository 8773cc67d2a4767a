"""The merge arithmetic, one base tensor at a time, in float32 row blocks.

The math is PEFT's ``merge_and_unload``, per base tensor W (shapes as the checkpoint stores them):

* LoRA: W' = W + Σᵢ wᵢ·sᵢ·BᵢAᵢ, s = alpha/r (alpha/√r with rsLoRA, per module after rank/alpha
  patterns), wᵢ the weight given to adapter i (it multiplies s, as PEFT's ``scale_layer`` does).
  ΔW is stored transposed, (BA)ᵀ, for ``fan_in_fan_out`` layers (GPT-2 Conv1D) and embeddings; conv
  factors are flattened, ΔW[o] = B[o]·A, whatever the kernel size.
  PEFT rounds an embedding's ΔW to the stored dtype before adding it, and a ``target_parameters``
  ΔW (fused MoE experts, routers; ParamWrapper.merge); so do we, to stay bit-identical.  A fused
  expert parameter's ΔW[e] = s·B[e]·A[e] lands on the fused base tensor (:class:`ExpertRowTerm`) or
  on the slice of each per-expert weight it was fused from (see :mod:`loratools.io.layouts`).
* ``lora_bias``: the base bias gains Σᵢ wᵢ·sᵢ·b_i.
* DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output feature: per row of linear and conv
  weights, per column of ``fan_in_fan_out`` weights and of embeddings (PEFT's conventions); for
  kohya/LyCORIS in-axis magnitudes (``wd_on_output=False``) per input feature, plus LyCORIS's ε
  (:func:`_in_axis_dora`).  An adapter weight w multiplies s inside the normalisation for
  per-output magnitudes, as PEFT's scale does; for per-input ones, which have no PEFT form, it
  interpolates W + w·(W' − W) with W' formed at full scale, as ComfyUI applies a strength
  (``comfy/weight_adapter/base.py`` ``weight_decompose``, v0.3.77; LyCORIS's own multiplier
  differs for w ≠ 1, all agree at w = 1).
* ``modules_to_save`` and saved ``*.base_layer.weight`` tensors replace the base tensor (LoRA terms on
  the same tensor then apply on top of the replacement, as in PEFT); trainable tokens replace rows
  (PEFT's ``index_copy``).  A replacement with more rows than the base (a grown vocabulary) gives
  every output row.

With a merge method other than the exact sum (:mod:`loratools.methods`: TIES, DARE, DELLA, ...),
the tensor's terms go to a :class:`~loratools.merging.combination.Combination`, which selects
once per whole tensor and joins per row block; the joined block is added to W, so row-block
streaming cannot change the result.  PEFT's rounding of embedding and ``target_parameters`` ΔW
does not apply there.

Everything is computed in float32 from the stored values and rounded once to the output dtype.
PEFT does the same, in the same order, when its adapter weights are float32 (its default: adapters
are upcast on load), so bf16 and fp16 merges are bit-identical to PEFT's (measured for plain, DoRA,
embedding and lora_bias adapters on sharded bases; tests/merging/test_run.py asserts it) and fp32
merges agree to within 1e-6.  Adapters in one call are summed in order into one float32
accumulator, which equals merging them one after another in float32 and rounding once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from ..adapter import MagnitudeAxis
from ..errors import SpecError
from ..io.streaming import Transform
from ..linalg import flat
from ..methods import Method, MethodOptions
from ..planner import Residual, TensorEdit
from ..scratch import buffer
from .combination import Combination
from .terms import BLOCK, ExpertRowTerm, RowTerm

_EPS = torch.finfo(torch.float32).eps  # LyCORIS's ε in the in-axis DoRA norm


@dataclass(frozen=True)
class Kernel:
    """One base tensor's planned edit in float32 on its device: the row-block merge step of :func:`loratools.merge`."""

    key: str
    terms: tuple[RowTerm, ...] = ()
    magnitude: torch.Tensor | None = None
    replacement: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None  # long (k,): rows replaced by token_values (k, cols) float32
    token_values: torch.Tensor | None = None
    residual: Residual | None = None  # taken from the whole base tensor before the rows are merged
    combination: Combination | None = None
    magnitude_axis: MagnitudeAxis = "out"  # DoRA's: per output feature (PEFT) or per input feature (LyCORIS wd_on_output=False)
    dora_weight: float = 1.0  # an in-axis DoRA's adapter weight w: W + w·(W' − W), W' formed at full scale (ComfyUI's strength)

    @property
    def trivial(self) -> bool:
        """Nothing changes: the output is the source tensor's bytes (an untied head copied from the embedding)."""
        return not self.terms and self.magnitude is None and self.replacement is None and self.token_rows is None

    @property
    def norm_cols(self) -> bool:
        """DoRA's norms run down the stored tensor's columns, so the tensor is one block: per output feature
        when ΔW is transposed, per input feature (a column, or a conv's column group) when it is not."""
        return any(t.transposed for t in self.terms) != (self.magnitude is not None and self.magnitude_axis == "in")

    def to(self, device: torch.device) -> Kernel:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Kernel(
            self.key,
            tuple(t.to(device) for t in self.terms),
            move(self.magnitude),
            move(self.replacement),
            move(self.token_rows),
            move(self.token_values),
            self.residual,
            self.combination,
            self.magnitude_axis,
            self.dora_weight,
        )

    @property
    def adds_low_rank(self) -> bool:
        """Whether this edit only adds plain LoRA products (:meth:`rows` then adds (B·A)·s for each, in order)."""
        plain = all(type(t) is RowTerm and not t.transposed and not t.rounded for t in self.terms)
        return plain and self.magnitude is None and self.replacement is None and self.token_rows is None

    def low_rank(self, r0: int, r1: int) -> tuple[tuple[torch.Tensor, torch.Tensor, float], ...] | None:
        """Rows ``r0:r1`` of this edit as (B rows, A, s) terms when it :attr:`adds_low_rank`, else None; for codecs
        that fuse the sum into their decode."""
        return tuple((t.B[r0:r1], t.A, t.scale) for t in self.terms) if self.adds_low_rank else None

    def rows(self, src: torch.Tensor, r0: int, r1: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Merged rows ``r0:r1`` in float32, from base rows ``src`` (any float dtype).

        ``scratch``: optional flat float32 buffer of at least 2·``src.numel()`` elements to work in.
        """
        shape = (r1 - r0, src.shape[1])
        n = shape[0] * shape[1]
        x = scratch[:n].view(shape) if scratch is not None else torch.empty(shape, dtype=torch.float32, device=src.device)
        work = scratch[n : 2 * n] if scratch is not None else None
        x.copy_(self.replacement[r0:r1] if self.replacement is not None else src)
        if self.token_rows is not None and self.token_values is not None:
            inside = (self.token_rows >= r0) & (self.token_rows < r1)
            x.index_copy_(0, self.token_rows[inside] - r0, self.token_values[inside])
        before = x.clone() if self.magnitude is not None and self.dora_weight != 1.0 else None
        for term in self.terms:
            delta = term.rows(r0, r1, work)
            x.add_(delta.to(src.dtype) if term.rounded else delta)
        if self.magnitude is not None and self.magnitude_axis == "in":
            _in_axis_dora(x, self.magnitude if self.norm_cols else self.magnitude[r0:r1], per_column=self.norm_cols)
            if before is not None:
                x.sub_(before).mul_(self.dora_weight).add_(before)
        elif self.magnitude is not None:
            norm = torch.linalg.norm(x, dim=0 if self.norm_cols else 1)
            magnitude = self.magnitude if self.norm_cols else self.magnitude[r0:r1]
            factor = magnitude / norm
            x.mul_(factor.view(1, -1) if self.norm_cols else factor.view(-1, 1))
        return x

    def transform(self, device: torch.device, pool: ThreadPoolExecutor | None = None) -> Transform:
        """The streaming step: fill the output rows from the input rows; on CPU, row blocks run on ``pool``."""
        moved = self.to(device)

        def run(src: torch.Tensor, dst: torch.Tensor) -> None:
            rows = dst.shape[0]
            edit = moved
            if edit.combination is not None:  # the method selects on each whole ΔWᵢ once; row blocks join slices of them
                term = edit.combination.term(edit.terms, (rows, dst.shape[1]), edit.key, device, pool)
                edit = replace(edit, terms=(term,), combination=None)
            if rows != src.shape[0]:  # a grown vocabulary: the replacement gives every row, src only its dtype
                src = src[:0]
            if edit.residual is not None:  # needs the whole tensor (an SVD or QR of it), then merges as usual
                src = residual_base(src.to(device), edit.residual)
            if device.type != "cpu":
                dst.copy_(edit.rows(src.to(device, non_blocking=True), 0, rows))  # waits for the GPU
                return
            step = rows if edit.norm_cols else max(1, BLOCK // max(1, src.shape[1]))

            def block(r0: int) -> None:
                r1 = min(rows, r0 + step)
                need = 2 * (r1 - r0) * src.shape[1]
                work = buffer("kernels", need, least=2 * BLOCK)
                dst[r0:r1].copy_(edit.rows(src[r0:r1] if src.shape[0] else src, r0, r1, work))

            if pool is None:
                for r0 in range(0, rows, step):
                    block(r0)
            else:
                list(pool.map(block, range(0, rows, step)))

        return run


def kernel(edit: TensorEdit, method: Method | None = None, options: MethodOptions | None = None) -> Kernel:
    """The float32 merge step for one planned edit: each term's factors flattened, weight·s folded into its scale.

    A bias term is B = b as a column and A = [[1]].  Non-DoRA embedding terms are rounded to the
    stored dtype before they are added, as PEFT does.  With a ``method`` other than task arithmetic
    the weights stay out of the terms and a :class:`Combination` combines them; DoRA and lora_bias
    terms are refused there (the methods are defined on a plain ΔW).
    """
    combining = method is not None and method.name != "task_arithmetic" and bool(edit.terms)
    if combining:
        _refuse_for_method(edit, method.name)  # type: ignore[union-attr]
    terms = []
    in_axis = edit.magnitude is not None and any(t.lora.magnitude_axis == "in" for t in edit.terms if t.lora.magnitude is not None)
    for t in edit.terms:
        scale = t.lora.scale if combining or in_axis else t.weight * t.lora.scale
        if t.bias is not None:
            terms.append(RowTerm(t.bias.float().reshape(-1, 1), torch.ones(1, 1), scale))
            continue
        rounded = (t.lora.kind == "embedding" and t.lora.magnitude is None) or t.rounded
        if t.lora.kind == "parameter":
            terms.append(ExpertRowTerm(t.lora.B.float(), t.lora.A.float(), scale, False, rounded, swapped=t.transposed))
            continue
        B, A = flat(t.lora.B.float(), t.lora.A.float())
        terms.append(RowTerm(B, A, scale, t.transposed, rounded))
    rows = values = None
    if edit.tokens is not None:
        rows = torch.tensor(edit.tokens.indices, dtype=torch.long)
        values = edit.tokens.values.float().reshape(len(edit.tokens.indices), -1)
    combination = None
    if combining:
        owners, weights = tuple(t.adapter for t in edit.terms), tuple(t.weight for t in edit.terms)
        modules = {t.module for t in edit.terms}
        stream = modules.pop() if len(modules) == 1 else edit.key
        combination = Combination(method, options or MethodOptions(), owners, weights, stream)  # type: ignore[arg-type]
    axis: MagnitudeAxis = "in" if in_axis else "out"
    weight = edit.terms[0].weight if in_axis else 1.0  # a DoRA tensor has no other term (planner: dora-shared-tensor)
    return Kernel(edit.key, tuple(terms), edit.magnitude, edit.replacement, rows, values, edit.residual, combination, axis, weight)


def _in_axis_dora(x: torch.Tensor, magnitude: torch.Tensor, *, per_column: bool) -> None:
    """DoRA along in_features, in place on merged rows ``x`` = W + ΔW: W' = W_c · m / (‖W_c‖_in + ε).

    lycoris-lora 4.1.3 ``functional/general.py`` ``_weight_decompose`` with ``wd_on_out=False``: the
    norm of each input feature's slice over every other axis (a column of a linear weight; for a conv,
    the in-channel's (out, kh, kw) slab, which the flat (out, in·kh·kw) rows hold as a column group),
    plus float32's ε as LyCORIS adds it.  ``per_column`` False: a transposed linear (fan_in_fan_out),
    whose stored rows are the input features.
    """
    if per_column:
        view = x.view(x.shape[0], magnitude.numel(), -1)
        norm = torch.linalg.vector_norm(view, dim=(0, 2)) + _EPS
        view.mul_((magnitude / norm).view(1, -1, 1))
    else:
        x.mul_((magnitude / (torch.linalg.norm(x, dim=1) + _EPS)).view(-1, 1))


def _refuse_for_method(edit: TensorEdit, name: str) -> None:
    if edit.magnitude is not None:
        raise SpecError(f"DoRA modules cannot be merged with method {name}: DoRA renormalises W + ΔW row by row", key=edit.key)
    biased = [t.module for t in edit.terms if t.bias is not None]
    if biased:
        raise SpecError(f"{biased[0]} has a lora_bias; method {name} is defined only for plain LoRA factors", key=edit.key)


def residual_base(W: torch.Tensor, residual: Residual) -> torch.Tensor:
    """The base weight PEFT builds when it loads a PiSSA/OLoRA adapter saved without conversion, in ``W``'s dtype.

    The same float32 operations in the same order as peft 0.21.2 tuners/lora/layer.py ``pissa_init``
    (an SVD of W, transposed under fan_in_fan_out; W − s·B₀A₀ with B₀ = V_r·√(S_r/s), A₀ = √(S_r/s)·U_rᵀ)
    and ``olora_init`` (a QR of W; W − s·Q_r·R_r), then rounded to the stored dtype as PEFT stores
    it, so the LoRA terms that follow are added to exactly the residual PEFT runs the adapter on.
    """
    w = W.to(torch.float32)
    k, s = residual.rank, residual.scale
    if residual.family == "pissa":
        w = w.T if residual.transposed else w
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[:k] / s
        A0 = torch.diag(torch.sqrt(Sr)) @ Uh[:k]
        B0 = V[:, :k] @ torch.diag(torch.sqrt(Sr))
        w = w - s * B0 @ A0
        w = w.T if residual.transposed else w
    else:
        Q, R = torch.linalg.qr(w)
        w = w - s * Q[:, :k].contiguous() @ R[:k].contiguous()
    return w.to(W.dtype).contiguous()
