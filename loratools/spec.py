"""Spec v1 in code: file names, tensor-name grammar, config rules, scaling and versions.

``spec/adapter-v1.md`` is the normative text and ``spec/adapter-v1.schema.json`` the schema for
``adapter_config.json``; this module is their executable form.  Tests check the three agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

from .errors import ArgumentError

SPEC_VERSION = "1.0"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
CARD_NAME = "README.md"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

META_FORMAT = "format"
META_VERSION = "loratools.spec_version"
META_SHA256 = "loratools.sha256"
META_LAYOUT = "loratools.sha256_layout"  # the tensor table META_SHA256 was computed over (io.tensorfile.layout_sha256)
META_CONFIG = "loratools.config"  # config embedded in a bare single-file adapter
META_SOURCE = "loratools.source_format"  # "kohya" / "diffusers": the layout an adapter was read from
META_PREFIX = "loratools.kohya_prefix"  # what precedes flatten(module) in kohya names mapped onto a bare base
# loratools' own metadata: recomputed on every write, never carried through from what was read.
OWN_METADATA = (META_VERSION, META_SHA256, META_LAYOUT, META_CONFIG, META_SOURCE, META_PREFIX)
# A kohya module name that was never mapped onto a module path (no base given when it was read).
KOHYA_NAME = re.compile(r"^lora_(unet|te\d?)_")

PREFIX = "base_model.model."
SUPPORTED_DTYPES = ("F32", "F16", "BF16")

# Suffix of each LoRA tensor after "<prefix><module>." and the role it plays.
TENSOR_ROLES: dict[str, str] = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_B.bias": "bias",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
_ROLE_RE = re.compile(r"^(?P<module>.+)\.(?P<suffix>" + "|".join(re.escape(s) for s in TENSOR_ROLES) + r")$")

BIAS_VALUES = ("none", "all", "lora_only")

# Choices every command and function shares, torch-free so the CLI can offer them without loading torch.
Format = Literal["peft", "kohya", "gguf"]
FORMATS: tuple[Format, ...] = ("peft", "kohya", "gguf")  # what writers produce; kohya and diffusers are read
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
DtypeChoice = Literal["keep", "fp16", "bf16", "fp32"]
DTYPE_CHOICES: tuple[DtypeChoice, ...] = ("keep", "fp16", "bf16", "fp32")
ENERGY_LEVELS = (0.9, 0.99, 0.999)  # kept fractions of ‖ΔW‖_F² for which `inspect --spectrum` gives the rank
_DTYPE_CODES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
_TORCH_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def dtype_choice(value: object) -> DtypeChoice:
    """The name in :data:`DTYPE_CHOICES` of a dtype given as a name, a ``torch.dtype`` or ``None`` (keep).

    One vocabulary for every call that writes tensors (merge, add, scale, resize, save, convert).
    """
    if value is None:
        return "keep"
    name = _TORCH_NAMES.get(str(value), value)
    if name not in DTYPE_CHOICES:
        raise ArgumentError(f"dtype {value!r} is not one of {', '.join(DTYPE_CHOICES)} (or torch.float16/bfloat16/float32)")
    return name  # type: ignore[return-value]


def dtype_code(value: object) -> str | None:
    """The safetensors dtype code (``"BF16"``) of a dtype (:func:`dtype_choice`); ``None`` for keep."""
    return _DTYPE_CODES.get(dtype_choice(value))


def missing_factor(roles: Collection[str]) -> tuple[str, str] | None:
    """The rule that a module needs both factors: ``(code, message)`` for a module holding ``roles``, or None.

    PEFT's ``lora_A``/``lora_B`` are kohya's ``lora_down``/``lora_up`` and diffusers' ``down``/``up``.
    """
    if "A" in roles and "B" in roles:
        return None
    missing = "lora_B" if "A" in roles else "lora_A"
    other = "lora_up/up" if missing == "lora_B" else "lora_down/down"
    return f"{missing.lower().replace('_', '-')}-missing", f"has no {missing} ({other}) tensor; every module needs both factors"


def split_key(key: str) -> tuple[str, str] | None:
    """Split a LoRA tensor key into ``(module, suffix)``; ``None`` for a non-LoRA tensor.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``("model.layers.0.q_proj", "lora_A.weight")``.
    Module names are relative to the base model, as PEFT's ``rank_pattern`` keys are.
    """
    match = _ROLE_RE.match(key)
    if match is None:
        return None
    module = match["module"]
    return (module[len(PREFIX) :] if module.startswith(PREFIX) else module), match["suffix"]


def tensor_key(module: str, suffix: str) -> str:
    """The on-disk key of one tensor of ``module`` (inverse of :func:`split_key`)."""
    return f"{PREFIX}{module}.{suffix}"


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's rule: the first pattern key ``k`` (in order) with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank the config declares for ``module`` (``r`` unless ``rank_pattern`` matches)."""
    patterns = config.get("rank_pattern") or {}
    key = pattern_key(patterns, module)
    return int(patterns[key]) if key is not None else int(config["r"])


def module_alpha(config: Mapping[str, Any], module: str) -> float:
    """The alpha the config declares for ``module`` (``lora_alpha`` unless ``alpha_pattern`` matches)."""
    patterns = config.get("alpha_pattern") or {}
    key = pattern_key(patterns, module)
    return float(patterns[key]) if key is not None else float(config["lora_alpha"])


def scaling(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA; ΔW = s·B·A."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def targets(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module`` (regex string: fullmatch; list: suffix)."""
    target = config.get("target_modules")
    if target is None:
        return False
    if isinstance(target, str):
        return target == "all-linear" or re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; raises ``ValueError`` on anything else."""
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if match is None:
        raise ValueError(f"spec version {text!r} is not MAJOR.MINOR")
    return int(match[1]), int(match[2])


def version_problem(text: str | None) -> str | None:
    """Why a reader of this spec may not read an adapter written to version ``text``; None if it may."""
    if text is None:
        return None  # plain PEFT adapter: reads as 1.0
    try:
        major, _ = parse_version(text)
    except ValueError as err:
        return str(err)
    ours, _ = parse_version(SPEC_VERSION)
    if major > ours:
        return f"written for spec version {text}, but this loratools reads spec {SPEC_VERSION} (major {major} > {ours}); upgrade loratools"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """JSON Schema's notion of an integer: 4 and 4.0 are, True is not."""
    return _is_number(value) and float(value).is_integer()


def _check_pattern(name: str, value: Any, *, integer: bool) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [(name, f"must be an object mapping module patterns to numbers, got {value!r}")]
    problems = []
    for key, number in value.items():
        ok = (_is_int(number) and number >= 1) if integer else (_is_number(number) and number > 0)
        if not ok:
            need = "an integer >= 1" if integer else "a number > 0"
            problems.append((f"{name}.{key}", f"must be {need}, got {number!r}"))
        try:
            re.compile(key)
        except re.error as err:
            problems.append((f"{name}.{key}", f"is not a valid regular expression ({err})"))
    return problems


def config_problems(config: Any) -> list[tuple[str, str]]:
    """Every way ``config`` breaks ``adapter-v1.schema.json``, as ``(field, message)`` pairs.

    Hand-written so the runtime needs no JSON Schema library; a test runs the real schema on the
    same example configs and checks both verdicts agree.
    """
    if not isinstance(config, dict):
        return [("", f"adapter_config.json must hold a JSON object, got {type(config).__name__}")]
    problems: list[tuple[str, str]] = []
    for field in ("peft_type", "r", "lora_alpha", "target_modules"):
        if field not in config:
            problems.append((field, "is required but missing"))
    if "peft_type" in config and not isinstance(config["peft_type"], str):
        problems.append(("peft_type", f"must be a string, got {config['peft_type']!r}"))
    if "r" in config and not (_is_int(config["r"]) and config["r"] >= 1):
        problems.append(("r", f"must be an integer >= 1, got {config['r']!r}"))
    if "lora_alpha" in config and not (_is_number(config["lora_alpha"]) and config["lora_alpha"] > 0):
        problems.append(("lora_alpha", f"must be a number > 0, got {config['lora_alpha']!r}"))
    target = config.get("target_modules")
    if "target_modules" in config:
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as err:
                problems.append(("target_modules", f"is not a valid regular expression ({err})"))
        elif not (isinstance(target, list) and target and all(isinstance(t, str) for t in target)):
            problems.append(("target_modules", f"must be a non-empty list of module names or a regex string, got {target!r}"))
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            problems.append((flag, f"must be true or false, got {config[flag]!r}"))
    problems += _check_pattern("rank_pattern", config.get("rank_pattern"), integer=True)
    problems += _check_pattern("alpha_pattern", config.get("alpha_pattern"), integer=False)
    if config.get("bias") is not None and config["bias"] not in BIAS_VALUES:
        problems.append(("bias", f"must be one of {', '.join(BIAS_VALUES)}, got {config['bias']!r}"))
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        problems.append(("modules_to_save", f"must be a list of module names, got {saved!r}"))
    for field in ("base_model_name_or_path", "revision", "task_type"):
        if config.get(field) is not None and not isinstance(config[field], str):
            problems.append((field, f"must be a string or null, got {config[field]!r}"))
    return problems
