"""Foreign safetensors metadata (kohya ``ss_*``, ``modelspec.*``): what stays true in an output, what
a file says about its training, and which edits ``loratools meta`` may make.

The one rule for writers (:func:`kept`): a writer writes new tensor bytes, so every hash of the
data section the input recorded is dropped (sd-scripts ``library/train_util.py``
``precalculate_safetensors_hashes`` hashes the tensor data for ``sshs_model_hash``/``sshs_legacy_hash``;
``library/sai_model_spec.py`` stores the same kind of hash as ``modelspec.hash_sha256``); the network
size (``ss_network_dim``/``ss_network_alpha``) is rewritten from the modules written, where the
input had it; and a LyCORIS network description is rewritten to the plain LoRA/LoCon modules every
writer writes (``ss_network_args`` ``algo`` "lora", with ``dora_wd``/``wd_on_output`` as the DoRA
modules are: lycoris-lora 4.1.3 ``lycoris/kohya.py`` reads those keys).  Everything else (training
tags, trigger phrase, titles, dataset descriptions) is history that a conversion or arithmetic does
not make false, and passes through.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import spec
from .errors import ArgumentError

HASHES = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
NETWORK_DIM, NETWORK_ALPHA, NETWORK_MODULE, NETWORK_ARGS = "ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args"
TAG_FREQUENCY, TRIGGER_PHRASE, MODELSPEC_TAGS = "ss_tag_frequency", "modelspec.trigger_phrase", "modelspec.tags"
# Keys a user may not set or delete: loratools' own (recomputed or verified on every read/write) and
# safetensors' "format", which PEFT and diffusers check.
PROTECTED = (*spec.OWN_METADATA, spec.META_FORMAT)
# Shown by `inspect` as the training summary, in this order, when present.
TRAINING_KEYS = (
    "modelspec.title",
    "modelspec.architecture",
    "ss_output_name",
    "ss_sd_model_name",
    "ss_base_model_version",
    NETWORK_MODULE,
    NETWORK_DIM,
    NETWORK_ALPHA,
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_epoch",
    "ss_steps",
    "ss_learning_rate",
    "ss_resolution",
    "modelspec.resolution",
)
TOP_TAGS = 20


def network_size(ranks: Iterable[int], alphas: Iterable[float]) -> dict[str, str]:
    """``ss_network_dim``/``ss_network_alpha`` of modules with these ranks and alphas ("Dynamic" when
    they differ, as sd-scripts' networks/resize_lora.py writes it)."""
    r, a = set(ranks), {_alpha_text(x) for x in alphas}
    return {NETWORK_DIM: str(r.pop()) if len(r) == 1 else "Dynamic", NETWORK_ALPHA: a.pop() if len(a) == 1 else "Dynamic"}


def kept(metadata: Mapping[str, str], *, ranks: Sequence[int], alphas: Sequence[float], dora_axes: set[str]) -> dict[str, str]:
    """The foreign ``metadata`` still true of newly written tensors: plain LoRA modules of ``ranks`` and
    ``alphas`` (alpha = scale·rank), with DoRA magnitudes along ``dora_axes`` ("out", "in")."""
    meta = {k: v for k, v in metadata.items() if k not in HASHES}
    if ranks and (NETWORK_DIM in meta or NETWORK_ALPHA in meta):
        meta |= network_size(ranks, alphas)
    if meta.get(NETWORK_MODULE, "").startswith("lycoris"):
        args = {"algo": "lora"}
        if dora_axes:
            args |= {"dora_wd": "True", "wd_on_output": "True" if dora_axes == {"out"} else "False"}
        meta[NETWORK_ARGS] = json.dumps(args)
    return meta


def describe(metadata: Mapping[str, str]) -> dict[str, Any]:
    """What ``metadata`` says about training: the trigger phrase, tags by frequency, the main ``ss_*``/``modelspec.*`` facts."""
    out: dict[str, Any] = {"trigger_phrase": metadata.get(TRIGGER_PHRASE)}
    out["modelspec_tags"] = [t.strip() for t in metadata[MODELSPEC_TAGS].split(",") if t.strip()] if MODELSPEC_TAGS in metadata else []
    tags, datasets, why = _tag_frequency(metadata.get(TAG_FREQUENCY))
    out["tags"] = [{"tag": tag, "count": count} for tag, count in tags.most_common(TOP_TAGS)]
    out["distinct_tags"], out["tag_datasets"], out["tags_unreadable"] = len(tags), datasets, why
    out["training"] = {k: metadata[k] for k in TRAINING_KEYS if k in metadata}
    return out


def _tag_frequency(text: str | None) -> tuple[Counter[str], int, str | None]:
    """kohya's ``ss_tag_frequency`` ({dataset dir: {tag: count}}) summed over datasets, or why it cannot be read."""
    counts: Counter[str] = Counter()
    if text is None:
        return counts, 0, None
    try:
        parsed = json.loads(text)
    except ValueError:
        return counts, 0, "ss_tag_frequency is not JSON"
    if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        return counts, 0, "ss_tag_frequency is not a {dataset: {tag: count}} object"
    for per_dataset in parsed.values():
        for tag, count in per_dataset.items():
            if isinstance(count, int) and not isinstance(count, bool):
                counts[tag.strip()] += count
    return counts, len(parsed), None


def edited(metadata: Mapping[str, str], *, set_: Mapping[str, str], delete: Sequence[str]) -> dict[str, str]:
    """``metadata`` with ``set_`` applied and ``delete`` removed; :class:`ArgumentError` for a protected key,
    a key both set and deleted, or a deleted key the file does not hold."""
    for key in (*set_, *delete):
        if key in PROTECTED:
            raise ArgumentError(
                f"metadata key {key!r} is loratools' or safetensors' own (recomputed or verified on every write); it cannot be edited"
            )
        if not key:
            raise ArgumentError("a metadata key cannot be empty")
    both = sorted(set(set_) & set(delete))
    if both:
        raise ArgumentError(f"metadata key {both[0]!r} is both set and deleted; give one of --set/--delete for it")
    missing = [k for k in delete if k not in metadata]
    if missing:
        raise ArgumentError(f"cannot delete metadata key {missing[0]!r}: the file has no such key")
    out = {k: v for k, v in metadata.items() if k not in delete}
    out.update(set_)
    return out


def parse_assignment(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` split at the first ``=`` (the value may hold more); :class:`ArgumentError` without one."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ArgumentError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _alpha_text(alpha: float) -> str:
    """alpha as kohya files store it (one float32), written as sd-scripts writes it."""
    (value,) = struct.unpack("<f", struct.pack("<f", float(alpha)))
    return str(int(value)) if value.is_integer() else repr(value)
