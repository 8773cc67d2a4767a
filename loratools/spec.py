"""Spec v1 in code: file names, tensor-name grammar, config rules, scaling and versions.

``spec/adapter-v1.md`` is the normative text and ``spec/adapter-v1.schema.json`` the schema for
``adapter_config.json``; this module is their executable form.  Tests check the three agree.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

from .errors import ArgumentError
from .patterns import SUFFIX_TEMPLATE, Job, first_matches, matches

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
META_SOURCE = "loratools.source_format"  # "kohya" / "diffusers" / "mlx": the layout an adapter was read from
META_PREFIX = "loratools.kohya_prefix"  # what precedes flatten(module) in kohya names mapped onto a bare base
# "flux" / "sd3": the model family whose fused-projection table (formats/fusion.py) named the modules.  Kept in
# every output (still true after arithmetic), so a diffusers file we wrote fuses back for kohya output.
META_ARCH = "loratools.architecture"
# loratools' own metadata: recomputed on every write, never carried through from what was read.
OWN_METADATA = (META_VERSION, META_SHA256, META_LAYOUT, META_CONFIG, META_SOURCE, META_PREFIX)
# Foreign metadata that describes how the factors are scaled: every writer drops it (or, as the kohya
# writer does with ss_network_dim/ss_network_alpha, rewrites it), since after arithmetic it would lie.
# diffusers raises "Both network_alphas and metadata cannot be specified" on a kohya file that keeps it.
META_DIFFUSERS_CONFIG = "lora_adapter_metadata"  # diffusers' per-component LoraConfig, as JSON
SCALING_METADATA = (META_DIFFUSERS_CONFIG,)
# A kohya module name that was never mapped onto a module path (no base given when it was read).
KOHYA_NAME = re.compile(r"^lora_(unet|te\d?)_")

PREFIX = "base_model.model."
# The component prefixes of diffusers' pipeline-level LoRA files (``unet.<module>``, ``transformer.<module>``).
DIFFUSERS_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "prior.")
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
# fullmatch, never "$": "$" also matches before a trailing newline, and "x.lora_A.weight\n" is no lora_A to PEFT.
_ROLE_RE = re.compile(r"(?P<module>.+)\.(?P<suffix>" + "|".join(re.escape(s) for s in TENSOR_ROLES) + r")")

BIAS_VALUES = ("none", "all", "lora_only")

# Choices every command and function shares, torch-free so the CLI can offer them without loading torch.
Format = Literal["peft", "kohya", "diffusers", "gguf", "mlx"]
FORMATS: tuple[Format, ...] = ("peft", "kohya", "diffusers", "gguf", "mlx")  # what writers produce
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
DtypeChoice = Literal["keep", "fp16", "bf16", "fp32"]
DTYPE_CHOICES: tuple[DtypeChoice, ...] = ("keep", "fp16", "bf16", "fp32")
PushFormat = Literal["peft", "original"]  # push --format: convert to a PEFT directory, or upload the input as it is
PUSH_FORMATS: tuple[PushFormat, ...] = ("peft", "original")

# Merge methods (--method) and sign-election rules (--majority-sign); defined in loratools/methods/,
# named here so that `--help` needs no torch.  tests/methods/test_registry.py checks they agree.
METHOD_CHOICES = ("task_arithmetic", "ties", "magnitude_prune", "dare", "dare_ties", "della", "della_linear")
MAJORITY_SIGN_CHOICES = ("total", "frequency")
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


def factor_shape_problem(a_shape: Sequence[int], b_shape: Sequence[int]) -> str | None:
    """Why shapes ``a_shape``/``b_shape`` cannot be a factor pair at all (rank and fit are checked later), or None."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        return "LoRA factors need at least 2 dimensions (A: r x in[ x k...], B: out x r[ x 1...])"
    return None


def alpha_problem(shape: Sequence[int], value: float) -> str | None:
    """Why a stored alpha tensor of ``shape`` whose first value is ``value`` is no alpha, or None.

    kohya and diffusers store alpha as one number (sd-scripts reads it with ``.item()``); a
    non-finite one would scale ΔW to Inf/NaN, which a merge would write out as the model.
    """
    if math.prod(shape) != 1:
        return f"alpha must be one number, but the tensor has shape {list(shape)}"
    if not math.isfinite(value):
        return f"alpha is {value}; a non-finite alpha makes ΔW non-finite"
    return None


def scaling_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """:func:`config_problems` for the fields that set the scale only (partial configs, e.g. diffusers metadata)."""
    fields = ("lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")
    return [(f, m) for f, m in config_problems({"r": 1, "lora_alpha": 1, **config}) if f.split(".")[0] in fields]


def split_key(key: str) -> tuple[str, str] | None:
    """Split a LoRA tensor key into ``(module, suffix)``; ``None`` for a non-LoRA tensor.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``("model.layers.0.q_proj", "lora_A.weight")``.
    Module names are relative to the base model, as PEFT's ``rank_pattern`` keys are.
    """
    match = _ROLE_RE.fullmatch(key)
    if match is None:
        return None
    module = match["module"]
    return (module[len(PREFIX) :] if module.startswith(PREFIX) else module), match["suffix"]


def tensor_key(module: str, suffix: str) -> str:
    """The on-disk key of one tensor of ``module`` (inverse of :func:`split_key`)."""
    return f"{PREFIX}{module}.{suffix}"


def pattern_key(patterns: Iterable[str], module: str, *, field: str = "rank_pattern") -> str | None:
    """PEFT's rule: the first pattern key ``k`` (in order) with ``re.match(rf"(.*\\.)?({k})$", module)``.

    peft 0.21.2 ``peft/utils/other.py`` ``get_pattern_key`` (which returns ``module`` itself for
    no match; here ``None``).  Runs within :data:`loratools.patterns.BUDGET_S`: a pattern that
    backtracks catastrophically raises :class:`SpecError` (code ``pattern-too-slow``) naming ``field``.
    """
    return pattern_keys(patterns, [module], field=field)[0]


def pattern_keys(patterns: Iterable[str], modules: Sequence[str], *, field: str = "rank_pattern") -> list[str | None]:
    """:func:`pattern_key` for many modules at once: each pattern compiled once, each module matched once."""
    keys = tuple(patterns)
    best = first_matches(Job(field, keys, tuple(modules), template=SUFFIX_TEMPLATE))
    return [keys[b] if b >= 0 else None for b in best]


def module_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank the config declares for ``module`` (``r`` unless ``rank_pattern`` matches)."""
    return module_ranks(config, [module])[0]


def module_ranks(config: Mapping[str, Any], modules: Sequence[str]) -> list[int]:
    """:func:`module_rank` of each of ``modules``, in one pass over ``rank_pattern``."""
    patterns = config.get("rank_pattern") or {}
    keys = pattern_keys(patterns, modules, field="rank_pattern") if patterns else [None] * len(modules)
    return [int(patterns[k]) if k is not None else int(config["r"]) for k in keys]


def module_alpha(config: Mapping[str, Any], module: str) -> float:
    """The alpha the config declares for ``module`` (``lora_alpha`` unless ``alpha_pattern`` matches)."""
    return module_alphas(config, [module])[0]


def module_alphas(config: Mapping[str, Any], modules: Sequence[str]) -> list[float]:
    """:func:`module_alpha` of each of ``modules``, in one pass over ``alpha_pattern``."""
    patterns = config.get("alpha_pattern") or {}
    keys = pattern_keys(patterns, modules, field="alpha_pattern") if patterns else [None] * len(modules)
    return [float(patterns[k]) if k is not None else float(config["lora_alpha"]) for k in keys]


def scaling(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA; ΔW = s·B·A."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_for(scale: float, rank: int) -> float:
    """An alpha whose alpha/r is ``scale``: exactly where such a float exists (scale·r or a neighbour),
    else the nearest (0.1 at r = 3 has none; within one ulp, the same float32 scale kernels multiply by)."""
    alpha = scale * rank
    up, down = [alpha], [alpha]
    for _ in range(2):
        up.append(math.nextafter(up[-1], math.inf))
        down.append(math.nextafter(down[-1], -math.inf))
    return min((alpha, *up[1:], *down[1:]), key=lambda a: abs(scaling(a, rank) - scale))


def targets(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module`` (regex string: fullmatch; list: suffix).

    A module named by a parameter path (``model.layers.0.mlp.experts.gate_up_proj``, see
    :func:`wrapped_parameters`) is selected by ``target_parameters`` instead.
    """
    return targeted(config, [module])[0]


def targeted(config: Mapping[str, Any], modules: Sequence[str]) -> list[bool]:
    """:func:`targets` for each of ``modules``, in time linear in their number.

    peft 0.21.2 ``peft/tuners/tuners_utils.py`` ``check_target_module_exists``, in its order: a
    module is excluded when ``exclude_modules`` selects it (a string: ``re.fullmatch``; a list: the
    suffix rule below) or when ``re.match(rf"(^|.*\\.){m}($|\\..*)", module)`` holds for an entry
    ``m`` of ``modules_to_save``; otherwise a ``target_modules`` string is ``re.fullmatch``-ed
    (``"all-linear"``, in any case, selects every linear layer; we cannot see layer types, so every
    module) and a list entry ``t`` selects ``m == t`` or ``m.endswith("." + t)``: looked up here as a
    set, once per dot of ``m``, not once per entry.  ``layers_to_transform`` is not applied.
    A ``target_parameters`` entry selects a parameter path by the same suffix rule.
    """
    excluded = _selected("exclude_modules", config.get("exclude_modules"), modules)
    saved = config.get("modules_to_save")
    if isinstance(saved, list) and saved and all(isinstance(m, str) for m in saved):
        hits = first_matches(Job("modules_to_save", tuple(saved), tuple(modules), template=r"(^|.*\.){}($|\..*)"))
        excluded = [e or h >= 0 for e, h in zip(excluded, hits, strict=True)]
    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        chosen = [True] * len(modules)
    else:
        chosen = _selected("target_modules", target, modules)
    params = config.get("target_parameters")
    by_parameter = _selected("target_parameters", params, modules) if isinstance(params, list) else [False] * len(modules)
    return [(c and not e) or p for c, e, p in zip(chosen, excluded, by_parameter, strict=True)]


def _selected(field: str, value: Any, modules: Sequence[str]) -> list[bool]:
    """PEFT's module selector: a regex string fullmatches; a list entry ``t`` selects ``t`` and ``*.t``."""
    if isinstance(value, str):
        return matches(field, value, modules, full=True)
    if not (isinstance(value, (list, tuple, set)) and value and all(isinstance(t, str) for t in value)):
        return [False] * len(modules)
    wanted = set(value)
    return [m in wanted or any(m[i + 1 :] in wanted for i, c in enumerate(m) if c == ".") for m in modules]


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
    """A finite JSON number a double can hold: not true/false, NaN, Infinity (Python's json reads them) or 1e400-sized ints."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= sys.float_info.max if isinstance(value, int) else math.isfinite(value)


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
            need = "an integer >= 1" if integer else "a finite number > 0"
            problems.append((f"{name}.{key}", f"must be {need}, got {clip(number)}"))
        why = regex_problem(rf"(.*\.)?({key})$")
        if why:
            problems.append((f"{name}.{key}", f"is not a valid regular expression as PEFT embeds it in (.*\\.)?(KEY)$ ({why})"))
    return problems


def regex_problem(pattern: str) -> str | None:
    r"""Why ``pattern`` does not compile, or None.

    PEFT embeds pattern keys in ``(.*\.)?(KEY)$`` (``get_pattern_key`` in peft/utils/other.py,
    0.21.2), so an inline global flag such as ``(?i)`` that compiles alone fails there.
    """
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:  # deep nesting overflows the parser
        return str(err) or type(err).__name__
    return None


def clip(value: Any) -> str:
    """``repr`` of a config value, at most 60 characters (an int of 4000 digits is not a message)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


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
        problems.append(("r", f"must be an integer >= 1, got {clip(config['r'])}"))
    if "lora_alpha" in config and not (_is_number(config["lora_alpha"]) and config["lora_alpha"] > 0):
        problems.append(("lora_alpha", f"must be a finite number > 0, got {clip(config['lora_alpha'])}"))
    target = config.get("target_modules")
    if "target_modules" in config:
        if isinstance(target, str):
            why = regex_problem(target)
            if why:
                problems.append(("target_modules", f"is not a valid regular expression ({why})"))
        elif not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
            problems.append(("target_modules", f"must be a list of module names or a regex string, got {clip(target)}"))
        elif not target and not config.get("target_parameters"):
            problems.append(("target_modules", "is empty and no target_parameters are given, so nothing is targeted"))
    params = config.get("target_parameters")
    if params is not None and not (isinstance(params, list) and all(isinstance(t, str) for t in params)):
        problems.append(("target_parameters", f"must be a list of parameter paths, got {clip(params)}"))
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
    problems += _text_problems(config)
    return problems


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_problems(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Strings holding a lone surrogate (``"\\ud800"`` is legal JSON to Python, not Unicode).

    No tool can print or UTF-8-encode them, and a safetensors header carrying one (say a kohya
    ``ss_sd_model_name`` copied from ``base_model_name_or_path``) is refused by the Rust reader.
    """
    problems = []
    stack: list[tuple[str, Any]] = [("", config)]
    while stack:
        where, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            field = f"{where}.{key}" if where else str(key)
            if any(isinstance(t, str) and _SURROGATE.search(t) for t in (key, value)):
                problems.append((_SURROGATE.sub("?", field), "holds a lone surrogate escape (\\ud800-\\udfff): not Unicode text"))
            elif isinstance(value, (dict, list)):
                stack.append((field, value))
    return problems


# Parameters of fused MoE expert modules, in the order the modules define them (transformers 5.24:
# models/mixtral, qwen2_moe, qwen3_moe, gpt_oss `...Experts.__init__`).  PEFT wraps the matching
# parameters of one module in that order, each wrapper around the previous one, so the last one's
# factors are saved under ``<module>.lora_A.weight`` and each earlier one gains a ``.base_layer``
# (peft 0.21.2 tuners/tuners_utils.py, BaseTuner._inject_parameters: `named_parameters(recurse=False)`).
EXPERT_PARAMETER_ORDER = ("gate_up_proj", "down_proj")
BASE_LAYER = ".base_layer"


def targets_parameter(config: Mapping[str, Any], path: str) -> bool:
    """PEFT's ``target_parameters`` rule: ``path`` equals an entry or ends with ``"." + entry``."""
    return any(path == t or path.endswith("." + t) for t in config.get("target_parameters") or [] if isinstance(t, str))


def wrapped_parameters(config: Mapping[str, Any], modules: Iterable[str]) -> dict[str, str]:
    """Which parameter each ``target_parameters`` wrapper among ``modules`` (names from :func:`split_key`) adapts.

    Returns ``{stored module name: parameter path}``, e.g. ``model.layers.0.mlp.experts.base_layer``
    -> ``model.layers.0.mlp.experts.gate_up_proj`` and ``model.layers.0.mlp.gate`` ->
    ``model.layers.0.mlp.gate.weight``.  A stored module whose wrapper depth cannot be told apart
    (several targeted parameters of unknown order on one module) is left out, and so is every
    module that ``target_parameters`` does not reach.
    """
    if not config.get("target_parameters"):
        return {}
    depths: dict[str, list[tuple[int, str]]] = {}
    for name in modules:
        owner, depth = name, 0
        while owner.endswith(BASE_LAYER):
            owner, depth = owner[: -len(BASE_LAYER)], depth + 1
        depths.setdefault(owner, []).append((depth, name))
    out: dict[str, str] = {}
    for owner, stored in depths.items():
        short = (t.rpartition(".")[2] for t in config["target_parameters"])
        hit = list(dict.fromkeys(p for p in short if targets_parameter(config, f"{owner}.{p}")))
        if not hit or any(targets(_only_modules(config), name) for _, name in stored if name == owner):
            continue
        if "weight" in hit:  # a module with a plain weight (a router) is no fused-experts module
            hit = [p for p in hit if p not in EXPERT_PARAMETER_ORDER]
        known = [p for p in EXPERT_PARAMETER_ORDER if p in hit]
        order = known + [p for p in hit if p not in known]
        present = sorted({d for d, _ in stored})
        if len(order) - len(known) > 1 or present != list(range(len(order))):
            continue  # which wrapper adapts which parameter cannot be told: left for not-targeted
        for depth, name in stored:
            out[name] = f"{owner}.{order[len(order) - 1 - depth]}"  # depth 0 is the last parameter
    return out


def unresolved_wrapper(config: Mapping[str, Any], name: str) -> str | None:
    """Why stored module ``name`` looks like a ``target_parameters`` wrapper that :func:`wrapped_parameters` could not place."""
    owner = name
    while owner.endswith(BASE_LAYER):
        owner = owner[: -len(BASE_LAYER)]
    short = list(dict.fromkeys(t.rpartition(".")[2] for t in config.get("target_parameters") or [] if isinstance(t, str)))
    hit = [p for p in short if targets_parameter(config, f"{owner}.{p}")]
    if not hit or (name == owner and targets(_only_modules(config), name)):
        return None
    return (
        f"target_parameters {', '.join(hit)} may be wrapped on {owner}, but which parameter these factors adapt cannot be told "
        f"(PEFT nests one wrapper per parameter in definition order; known order: {', '.join(EXPERT_PARAMETER_ORDER)})"
    )


def _only_modules(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"target_modules": config.get("target_modules")}
