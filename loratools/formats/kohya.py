"""kohya/sd-scripts LoRA files: read them into an :class:`Adapter`, write adapters back out.

A kohya file is one ``.safetensors`` whose module names are base module paths with the dots
flattened to underscores behind a component prefix: ``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``lora_te1_``/``lora_te2_``/``lora_te3_``
with several text encoders).  Each module holds ``.lora_down.weight`` (A: r x in[ x kh x kw]),
``.lora_up.weight`` (B: out x r[ x 1 x 1]), an optional float ``.alpha`` (missing means alpha = r,
scale 1) and DoRA's ``.dora_scale`` (per output or per input feature: :func:`dora_magnitude`);
ΔW = alpha/r · up·down, the same rule as PEFT's.

Flattening loses the dots (``attn1_to_q`` could be ``attn1.to_q`` or ``attn1_to.q``), so names are
mapped with a base checkpoint: every base key is flattened the same way and looked up.  UNet names
also map across layouts (:mod:`.sdunet`): SD1/SD2 names (diffusers') onto an original single file,
SDXL names (SGM's ``input_blocks``) onto a diffusers UNet.  Without a
base the kohya name stays the module name and ``loratools.source_format: kohya`` in the metadata
records where the adapter came from, so :func:`save_kohya` writes it back unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import metadata, spec
from ..adapter import Adapter, LoraModule, MagnitudeAxis, RawAdapter, raw_from_modules
from ..errors import ArgumentError, FormatError, LoratoolsError
from ..io.atomic import atomic_output
from ..io.checkpoint import module_index, open_checkpoint
from ..io.tensorfile import Header, load_tensors, write_file
from . import sdunet

META_SOURCE, META_PREFIX = spec.META_SOURCE, spec.META_PREFIX

NETWORK_ARGS = metadata.NETWORK_ARGS
DOWN, UP, ALPHA, DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"
_SUFFIXES = (DOWN, UP, ALPHA, DORA)
_ROLES = {DOWN: "A", UP: "B"}

# Base key prefix -> kohya prefix, for checkpoints holding several components (LDM single files,
# diffusers-style prefixed state dicts).  "text_encoder." is lora_te_ or lora_te1_: see _te_prefix.
_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "lora_unet_"),
    ("cond_stage_model.transformer.", "lora_te_"),
    ("conditioner.embedders.0.transformer.", "lora_te1_"),
    ("unet.", "lora_unet_"),
    ("transformer.", "lora_unet_"),
    ("text_encoder.", "lora_te_"),
    ("text_encoder_2.", "lora_te2_"),
    ("text_encoder_3.", "lora_te3_"),
)
# A base holding one component (a unet file, a CLIP text model) has bare keys: any prefix may apply.
# CLIP text models saved by transformers >= 5 drop the "text_model." level kohya names still carry.
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_BARE_PREFIXES = ("lora_unet_", *_TE_PREFIXES, *(p + "text_model_" for p in _TE_PREFIXES))


def is_kohya(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` look like a kohya file (any ``.lora_down.weight``/``.lora_up.weight``)."""
    return any(n.endswith((DOWN, UP)) for n in names)


def flatten(path: str) -> str:
    """kohya's flattening of a module path: dots become underscores."""
    return path.replace(".", "_")


def map_names(names: Iterable[str], base: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Map kohya module names onto ``base``'s module paths by flattening every base key.

    Returns ``(mapped, unmapped)``: kohya name -> module path, and kohya name -> why it did not map
    (no base key flattens to it, or several do).  Module paths are the base's own, so the mapped
    adapter fits that base (and a PEFT model built on it) directly.
    """
    try:
        checkpoint = open_checkpoint(base)
    except LoratoolsError as err:
        err.code = "base-unreadable"  # the base is at fault, not the kohya file
        raise
    # flattened name -> its one module, or the list of several: one dict entry per flattening (about
    # 14 per base module), a list only where names collide, so a 100k-key base stays small and linear.
    candidates: dict[str, str | list[str]] = {}
    for module in module_index(checkpoint.tensors):
        for flat in _flattenings(module):
            seen = candidates.setdefault(flat, module)
            if isinstance(seen, list):
                seen.append(module)
            elif seen != module:
                candidates[flat] = [seen, module]
    mapped, unmapped = {}, {}
    for name in names:
        hit = candidates.get(name, [])
        found = set(hit) if isinstance(hit, list) else {hit}
        if len(found) == 1:
            mapped[name] = next(iter(found))
        else:
            unmapped[name] = f"several base modules flatten to it: {sorted(found)}" if found else f"no module of base {base} flattens to it"
    return mapped, unmapped


def _flattenings(module: str) -> list[str]:
    pairs = [(kp, module[len(bp) :]) for bp, kp in _COMPONENTS if module.startswith(bp)]
    if module.startswith("text_encoder."):
        pairs.append(("lora_te1_", module[len("text_encoder.") :]))
    # a CLIPTextModel saved by transformers >= 5 under a component prefix also lacks the text_model level
    pairs += [(kp, "text_model." + rest) for kp, rest in pairs if kp in _TE_PREFIXES and not rest.startswith("text_model.")]
    prefixed = [kp + flatten(rest) for kp, rest in pairs]
    return prefixed + [kp + flatten(module) for kp in _BARE_PREFIXES] + _unet_flattenings(module)


def _unet_flattenings(module: str) -> list[str]:
    """The kohya names of a UNet module in the other layout: diffusers names for an original single
    file's ``model.diffusion_model.input_blocks...``, SGM names (SDXL) for a diffusers UNet's (:mod:`.sdunet`)."""
    if module.startswith("model.diffusion_model."):
        other = sdunet.to_diffusers(module[len("model.diffusion_model.") :])
        return ["lora_unet_" + flatten(other)] if other else []
    return ["lora_unet_" + flatten(o) for o in sdunet.to_original(module.removeprefix("unet."))]


def read(header: Header, *, base: str | Path | None = None) -> RawAdapter:
    """Read the kohya file behind ``header`` as a spec v1 :class:`RawAdapter` (config synthesized).

    With ``base``, names are mapped onto base module paths; names that do not map keep their kohya
    name, so validation against ``base`` lists each of them.  ``ss_*`` metadata passes through.
    """
    parts = _module_parts(header)
    tensors = load_tensors(header)
    hint = dora_hint(header.metadata)
    return from_modules(header, {name: lora_module(tensors, header.path, name, p, hint=hint) for name, p in parts.items()}, base=base)


def from_modules(header: Header, modules: Mapping[str, LoraModule], *, base: str | Path | None = None) -> RawAdapter:
    """kohya-named ``modules`` read from ``header``'s file (kohya or LyCORIS) as a spec v1 :class:`RawAdapter`.

    With ``base``, names are mapped onto base module paths; names that do not map keep their kohya
    name, so validation against ``base`` lists each of them.  ``ss_*`` metadata passes through.
    """
    mapped: dict[str, str] = {}
    if base is not None:
        mapped, _ = map_names(modules, base)
    out: dict[str, LoraModule] = {}
    for name, module in modules.items():
        target = mapped.get(name, name)
        if target in out:
            raise FormatError(f"two kohya modules map to base module {target}", path=header.path, key=name)
        out[target] = module
    metadata = dict(header.metadata)
    metadata[META_SOURCE] = "kohya"
    bare = {kp for name, path in mapped.items() for kp in _BARE_PREFIXES if name == kp + flatten(path)}
    if len(bare) == 1:
        metadata[META_PREFIX] = bare.pop()
    return raw_from_modules(out, header, metadata)


def _module_parts(header: Header) -> dict[str, dict[str, str]]:
    """kohya module name -> {suffix: tensor name}; refuses unknown tensors and incomplete pairs."""
    parts: dict[str, dict[str, str]] = {}
    unknown = []
    for key in header.tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        parts.setdefault(key[: -len(suffix)], {})[suffix] = key
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise FormatError(f"kohya file holds tensors that are not LoRA factors: {listed}", path=header.path)
    for name, p in parts.items():
        missing = spec.missing_factor({_ROLES[s] for s in p if s in _ROLES})
        if missing is not None:
            raise FormatError(missing[1], path=header.path, key=name, code=missing[0])
    return parts


def lora_module(
    tensors: Mapping[str, torch.Tensor], path: Path, name: str, parts: Mapping[str, str], *, hint: MagnitudeAxis | None = None
) -> LoraModule:
    """One module from its ``tensors``; a missing alpha, or alpha 0, means alpha = r (scale 1), as in sd-scripts.
    ``hint``: the DoRA axis the file's metadata records (:func:`dora_hint`)."""
    A, B = tensors[parts[DOWN]], tensors[parts[UP]]
    why = spec.factor_shape_problem(A.shape, B.shape)
    if why:
        raise FormatError(f"lora_down {list(A.shape)} and lora_up {list(B.shape)}: {why}", path=path, key=name, code="bad-shape")
    # sd-scripts networks/lora.py (LoRAModule.__init__): a missing alpha, or alpha 0, means alpha = rank
    stored = alpha_value(tensors[parts[ALPHA]], path=path, key=parts[ALPHA]) if ALPHA in parts else 0.0
    alpha = stored if stored != 0.0 else float(A.shape[0])
    magnitude: torch.Tensor | None = None
    axis: MagnitudeAxis = "out"
    if DORA in parts:
        magnitude, axis = dora_magnitude(tensors[parts[DORA]], A, B, hint=hint, path=path, key=parts[DORA])
    return LoraModule(A, B, alpha, False, "conv" if A.dim() > 2 else "linear", magnitude, None, axis)


def dora_magnitude(
    dora: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, hint: MagnitudeAxis | None, path: Path, key: str
) -> tuple[torch.Tensor, MagnitudeAxis]:
    """A ``dora_scale`` as a flat magnitude and its axis, told from its shape (``hint``: what the file's
    metadata says, for a flat vector on a square layer).

    lycoris-lora 4.1.3 ``lycoris/modules/locon.py`` (LoHa and LoKr alike) stores the norms of W's rows
    as (out, 1[, 1, 1]) with ``wd_on_output=True`` and of its columns as (1, in[, 1, 1]) with
    ``wd_on_output=False`` (kohya-trained LyCORIS files, OneTrainer): the two shapes differ even on a
    square layer.  A flat vector says only its length, so on a square layer (out = in) it is refused
    unless ``ss_network_args`` names ``wd_on_output``.
    """
    out, inp, shape = int(B.shape[0]), int(A.shape[1]), tuple(dora.shape)
    unit_tail = len(shape) >= 2 and all(d == 1 for d in shape[2:])
    axis: MagnitudeAxis | None = None
    if unit_tail and shape[:2] == (out, 1):
        axis = "out"
    elif unit_tail and shape[:2] == (1, inp):
        axis = "in"
    elif len(shape) == 1 and shape[0] == out == inp:
        axis = hint if out > 1 else "out"  # a 1 x 1 weight: both conventions are the same
        if axis is None:
            raise FormatError(
                f"dora_scale is a flat vector of {out} on a square layer ({out} x {inp}), so it cannot tell whether it runs along "
                "out_features (PEFT, LyCORIS wd_on_output=True) or in_features (kohya/LyCORIS wd_on_output=False); re-save it as "
                f"[{out}, 1] or [1, {inp}] (or record wd_on_output in ss_network_args)",
                path=path,
                key=key,
                code="dora-ambiguous",
            )
    elif len(shape) == 1 and shape[0] in (out, inp):
        axis = "out" if shape[0] == out else "in"
    if axis is None:
        raise FormatError(
            f"dora_scale of shape {list(shape)} fits neither [{out}, 1] (per output feature) nor [1, {inp}] (per input feature)",
            path=path,
            key=key,
            code="bad-shape",
        )
    return dora.reshape(-1), axis


def dora_hint(metadata: Mapping[str, str]) -> MagnitudeAxis | None:
    """The DoRA axis ``ss_network_args`` records (LyCORIS's ``wd_on_output``), or None when it does not say."""
    try:
        args = json.loads(metadata.get(NETWORK_ARGS, "{}"))
    except ValueError:
        return None
    value = args.get("wd_on_output") if isinstance(args, dict) else None
    if value is None:
        return None
    return "out" if str(value).lower() in ("true", "1") else "in"  # lycoris/utils str_bool


def alpha_value(tensor: torch.Tensor, *, path: Path, key: str) -> float:
    """The number a stored ``.alpha`` tensor holds; :class:`FormatError` unless it is one finite number."""
    value = float(tensor.reshape(-1)[0].double()) if tensor.numel() else math.nan
    why = spec.alpha_problem(tuple(tensor.shape), value)
    if why:
        raise FormatError(why, path=path, key=key, code="bad-alpha")
    return value


def kohya_name(module: str, *, te_prefix: str = "lora_te_", bare_prefix: str | None = None) -> str:
    """The kohya name of module path ``module`` (a kohya name already is returned as is)."""
    if module.startswith("lora_") and "." not in module:
        return module
    for bp, kp in _COMPONENTS:
        if module.startswith(bp):
            return (te_prefix if bp == "text_encoder." else kp) + flatten(module[len(bp) :])
    if bare_prefix is None:
        bare_prefix = te_prefix if module.startswith("text_model.") else "lora_unet_"
    return bare_prefix + flatten(module)


def kohya_state_dict(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and ``__metadata__`` of ``adapter`` in kohya layout.

    rsLoRA modules get alpha·sqrt(r) so alpha/r reproduces their scale; DoRA magnitudes become
    ``dora_scale`` (out x 1[ x 1 x 1]), or (1 x in[ x 1 x 1]) for in-axis ones, as LyCORIS stores
    them.  Embedding modules, ``lora_B.bias`` and ``modules_to_save`` have no kohya form and are refused.
    """
    if adapter.extra_tensors:
        raise FormatError(
            f"kohya files cannot hold modules_to_save tensors ({', '.join(list(adapter.extra_tensors)[:3])}); convert to peft instead"
        )
    multi_te = any(m.startswith(("text_encoder_2.", "text_encoder_3.")) for m in adapter.modules)
    te_prefix = "lora_te1_" if multi_te or adapter.metadata.get(META_PREFIX, "").startswith("lora_te1_") else "lora_te_"
    tensors: dict[str, torch.Tensor] = {}
    for module, m in adapter.modules.items():
        if m.kind == "parameter":
            raise FormatError("kohya files cannot hold PEFT target_parameters (fused MoE experts); convert to peft instead", key=module)
        if m.kind == "embedding" or m.bias is not None:
            raise FormatError("kohya files hold linear and conv LoRA only (no embeddings, no lora_B.bias)", key=module)
        name = kohya_name(module, te_prefix=te_prefix, bare_prefix=adapter.metadata.get(META_PREFIX))
        if name + DOWN in tensors:
            raise FormatError(f"two modules flatten to the same kohya name {name}", key=module)
        tensors[name + DOWN] = m.A.contiguous()
        alpha = m.scale * m.rank
        # readers take alpha 0 for "alpha = rank" (sd-scripts), so a zero scale goes into lora_up instead
        tensors[name + UP] = (m.B if alpha != 0 else torch.zeros_like(m.B)).contiguous()
        tensors[name + ALPHA] = torch.tensor(alpha if alpha != 0 else float(m.rank), dtype=torch.float32)
        if m.magnitude is not None and m.magnitude_axis == "in":  # LyCORIS wd_on_output=False: (1, in[, 1, 1])
            tensors[name + DORA] = m.magnitude.reshape(1, -1, *([1] * (m.A.dim() - 2))).contiguous()
        elif m.magnitude is not None:
            tensors[name + DORA] = m.magnitude.reshape(-1, *([1] * (m.A.dim() - 1))).contiguous()
    return tensors, _kohya_metadata(adapter)


def _kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """Foreign metadata kept, ``ss_network_dim``/``ss_network_alpha`` rewritten to tell the truth."""
    meta = adapter.foreign_metadata()
    meta |= metadata.network_size([m.rank for m in adapter.modules.values()], [m.scale * m.rank for m in adapter.modules.values()])
    meta.setdefault(metadata.NETWORK_MODULE, "networks.lora")
    meta[spec.META_FORMAT] = "pt"
    if adapter.base_model and "ss_sd_model_name" not in meta:
        meta["ss_sd_model_name"] = adapter.base_model
    return meta


def write(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """Write ``adapter`` as a kohya ``.safetensors`` file, atomically, with a data checksum; returns ``path``."""
    if path.suffix != ".safetensors":
        raise ArgumentError("a kohya output is a single file; give it a .safetensors name", path=path)
    tensors, meta = kohya_state_dict(adapter)
    with atomic_output(path, force=force, directory=False) as tmp:
        write_file(tmp, tensors, meta, checksum_key=spec.META_SHA256, layout_key=spec.META_LAYOUT)
    return path
