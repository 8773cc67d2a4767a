"""PEFT variants whose meaning is not a plain ΔW on the base weight, and the layer classes that
decide ``fan_in_fan_out``: spec rules that need no tensors (issue 13).

PiSSA/OLoRA/CorDA/LoftQ saved without weight conversion, aLoRA and ``layer_replication`` are not
``W + ΔW`` on the base they name; the planner refuses to merge them, arithmetic refuses what it
cannot carry, plain ``validate`` warns.  Which modules a built-in model builds as ``Conv1D``
(stored in x out) is known from its ``model_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

# init_lora_weights values after which PEFT rewrites the base weight when it *loads* the adapter
# (peft 0.21.2, peft/tuners/lora/layer.py LoraLayer.update_layer -> pissa_init, olora_init,
# corda_init, loftq_init): the stored A, B are meant for that rewritten base, not the original W.
# PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) stores the equivalent plain
# LoRA instead (rank 2r, init_lora_weights true); every other value ("eva", "orthogonal", "mica",
# "lora_ga", "gaussian", true, false) leaves the base untouched on load.
_RESIDUAL_WHY = {
    "pissa": "PEFT rebuilds the residual base W - s·B0·A0 from an SVD of the base when it loads this adapter",
    "olora": "PEFT rebuilds the residual base W - s·Q_r·R_r from a QR of the base when it loads this adapter",
    "corda": "PEFT trained it against the residual base W - s·B0·A0 built from activation covariances "
    "(preprocess_corda), which the adapter file does not hold; PEFT cannot even load it without them",
    "loftq": "PEFT replaces the base weights by LoftQ's quantised approximation when it loads this adapter",
}
_CONVERT = (
    "convert it to a plain LoRA first: in PEFT, save_pretrained(out, path_initial_model_for_weight_conversion=<the "
    "adapter as initialised, saved with init_lora_weights=True>) writes the same model as a rank-2r LoRA on the original base"
)
_LOFTQ_FIX = (
    "merge it into the LoftQ backbone it was trained on (saved by PEFT's LoftQ utilities) after setting "
    "init_lora_weights to true in adapter_config.json"
)


# Residual inits a merge rebuilds exactly from the base weight, as PEFT does on load: PiSSA's full
# SVD and OLoRA's QR are deterministic in W (the top-r part U_r·S_r·V_rᵀ, and Q_r·R_r, do not
# depend on the signs LAPACK picks).  pissa_niter_K uses a randomized SVD, CorDA activation
# covariances and LoftQ a quantised backbone, none of which the files hold.
REBUILT = frozenset({"pissa", "olora"})


def rebuilt_init(config: Mapping[str, Any]) -> str | None:
    """``pissa`` or ``olora`` when the residual base is rebuilt exactly by a merge (see :data:`REBUILT`), else None."""
    init = config.get("init_lora_weights")
    return init.lower() if isinstance(init, str) and init.lower() in REBUILT else None


def residual_init(config: Mapping[str, Any]) -> str | None:
    """The family (``pissa``, ``olora``, ``corda``, ``loftq``) whose init makes PEFT rewrite the base on load, or None."""
    init = config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    name = init.lower()
    for family in _RESIDUAL_WHY:
        if name == family or (family in ("pissa", "corda") and name.startswith(family)):
            return family
    return None


def variant_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Config features under which the adapter is not ``W + ΔW`` on the base it names, as ``(code, field, why)``.

    Each makes a merge impossible to do exactly from the adapter and base files alone; the planner
    refuses them, arithmetic and conversion refuse what they cannot carry through, and plain
    ``validate`` warns.  The message says what would work instead.
    """
    problems = []
    family = residual_init(config)
    if family is not None:
        fix = _LOFTQ_FIX if family == "loftq" else _CONVERT
        if rebuilt_init(config):
            fix = (
                "loratools merges it exactly (rebuilding that residual as PEFT does), but other formats and arithmetic cannot carry it: "
                + fix
            )
        why = f"init_lora_weights is {config['init_lora_weights']!r}: {_RESIDUAL_WHY[family]}, so W + ΔW would be the wrong model; {fix}"
        problems.append(("residual-init", "init_lora_weights", why))
    tokens = config.get("alora_invocation_tokens")
    if tokens:  # peft 0.21.2 peft/tuners/lora/variants.py: ALoraLinearVariant.merge_safe/merge_unsafe raise
        why = (
            f"alora_invocation_tokens is {tokens!r}: aLoRA applies ΔW only to the tokens after that invocation sequence, "
            "so no merged weight reproduces it (PEFT refuses to merge it too); serve it unmerged with PEFT or vLLM, "
            "or drop alora_invocation_tokens if you want ΔW on every token"
        )
        problems.append(("alora-unmergeable", "alora_invocation_tokens", why))
    replication = config.get("layer_replication")
    if replication:
        why = (
            f"layer_replication is {replication!r}: PEFT stacks copies of base layers into a deeper model and the adapter's "
            "layer indices refer to those copies, so its modules do not belong on the base's layers of the same index; "
            "loratools does not write the expanded checkpoint (PEFT's merge_and_unload adds every copy's ΔW to the one "
            "shared base tensor, which is wrong too): serve it unmerged with PEFT"
        )
        problems.append(("layer-replication", "layer_replication", why))
    return problems


# Module names transformers builds as ``pytorch_utils.Conv1D`` (weight stored in x out), by the
# ``model_type`` of the base's config.json (transformers 5.24: models/gpt2, decision_transformer,
# imagegpt, openai, clvp modeling files).  Every other module of a built-in model type is an
# ``nn.Linear`` (out x in).
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}

CONV1D_NAMES = frozenset().union(*CONV1D_MODULES.values())

LayerType = Literal["linear", "conv1d"]


def layer_type(model_config: Mapping[str, Any] | None, module: str) -> LayerType | None:
    """Whether ``module`` is a Conv1D or an nn.Linear in the model ``model_config`` describes; None if it does not say.

    Only a built-in transformers model type decides: a config with ``auto_map`` runs remote code,
    whose layer classes no file names.
    """
    if not model_config or model_config.get("auto_map") or not isinstance(model_config.get("model_type"), str):
        return None
    leaf = module.rsplit(".", 1)[-1]
    return "conv1d" if leaf in CONV1D_MODULES.get(model_config["model_type"], frozenset()) else "linear"


def variant_warnings(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Config features under which a merge reproduces PEFT's inference but perhaps not the trained model, as ``(code, field, why)``.

    LoRA-GA trains against the residual base W - s·B0·A0 (peft 0.21.2, peft/tuners/lora/layer.py
    ``lora_ga_init``), but on load PEFT keeps the original W (no gradients to rebuild it from), so
    PEFT's own inference, and a merge, use W + ΔW.
    """
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "lora_ga":
        why = (
            "init_lora_weights is 'lora_ga': it was trained against a residual base, but PEFT loads it on the original "
            "base, as this merge does; for the trained model convert it with PEFT's "
            "save_pretrained(out, path_initial_model_for_weight_conversion=...) first"
        )
        return [("lora-ga-unconverted", "init_lora_weights", why)]
    return []
