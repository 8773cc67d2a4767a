"""How an adapter's modules read against a base, before they are mapped: PEFT variants that no plain
merge reproduces, and whether each linear ΔW is stored transposed (PEFT's ``fan_in_fan_out`` rule).

Both are the planner's (:mod:`loratools.planner`) first steps for each adapter; they need the
adapter's config, the base tensors it matched and the base's config.json, nothing else.
"""

from __future__ import annotations

from . import spec, variants
from .adapter import Adapter
from .errors import Problem
from .io.tensorfile import TensorInfo


def variant_problems(adapter: Adapter, label: str = "") -> list[Problem]:
    """Errors for config features (:func:`loratools.variants.variant_problems`) under which no exact merge exists.

    PiSSA/OLoRA/CorDA/LoftQ saved without weight conversion, aLoRA and ``layer_replication``: the
    merge is refused in one line that says why and what would work.  Otherwise the warnings of
    :func:`loratools.variants.variant_warnings` (an unconverted LoRA-GA adapter).
    """
    rebuilt = variants.rebuilt_init(adapter.config) is not None  # merged exactly: see Residual
    found = [v for v in variants.variant_problems(adapter.config) if not (rebuilt and v[0] == "residual-init")]
    errors = [Problem(code, f"{label}{field}", why) for code, field, why in found]
    return errors or [Problem(code, f"{label}{field}", why, "warning") for code, field, why in variants.variant_warnings(adapter.config)]


def orientations(
    adapter: Adapter, found: dict[str, TensorInfo], model_config: dict | None, label: str = ""
) -> tuple[dict[str, bool], list[Problem]]:
    """Whether the base stores each module's ΔW transposed, decided the way PEFT decides it; and the problems.

    PEFT ignores ``fan_in_fan_out`` where it contradicts the layer: it forces the flag to false on
    an ``nn.Linear`` and to true on a ``Conv1D``, with a warning (peft 0.21.2,
    peft/tuners/lora/layer.py ``dispatch_default``).  Without the model class the layer is known from
    the base's config.json (:func:`loratools.variants.layer_type`: built-in model types), else from the
    base tensor's shape when out != in ((out, in) is a Linear, (in, out) a Conv1D).  A square
    layer that neither tells is taken as an nn.Linear only when the flag is false, its name is
    not one transformers gives Conv1D layers (``c_attn``, ``c_proj``, ...) and no other layer
    shows the flag wrong; otherwise it is refused (``fan-in-fan-out-undecidable``) rather than guessed.
    An overridden flag is one warning (``fan-in-fan-out-overridden``) per adapter.

    ``found``: the base tensor of every module that has one.  Modules missing from the returned
    dict were refused; embeddings and convs keep their fixed layout.
    """
    flag = adapter.fan_in_fan_out
    layouts: dict[str, bool] = {}
    overridden: list[tuple[str, str]] = []  # (module, why the layer is the other kind)
    square: list[str] = []
    for name, module in adapter.modules.items():
        info = found.get(name)
        if module.kind != "linear" or info is None:
            layouts[name] = module.transposed(fan_in_fan_out=flag)
            continue
        out, inp = int(module.B.shape[0]), int(module.A.shape[1])
        kind = variants.layer_type(model_config, name)
        if kind is not None:
            conv1d = kind == "conv1d"
            why = f"{model_config['model_type'] if model_config else ''} builds it as {'a Conv1D' if conv1d else 'an nn.Linear'}"
        elif out != inp and info.shape in ((out, inp), (inp, out)):
            conv1d = info.shape == (inp, out)
            why = f"base tensor {info.name} is stored {'in x out (Conv1D)' if conv1d else 'out x in (nn.Linear)'}"
        elif out != inp:
            conv1d, why = flag, ""  # fits neither way: _fit reports the shapes
        else:
            square.append(name)
            continue
        layouts[name] = conv1d
        if conv1d != flag:
            overridden.append((name, why))
    problems = []
    if overridden:
        first, why = overridden[0]
        cls = "Conv1D" if not flag else "nn.Linear"
        layers = f"{first} and {len(overridden) - 1} more are {cls} layers" if len(overridden) > 1 else f"{first} is a {cls} layer"
        message = (
            f"fan_in_fan_out is {str(flag).lower()} but {layers} ({why}); PEFT overrides the flag on such layers "
            "with a warning, and this plan does the same"
        )
        problems.append(Problem("fan-in-fan-out-overridden", f"{label}fan_in_fan_out", message, "warning"))
    for name in square:
        leaf = name.rsplit(".", 1)[-1]
        if not flag and not overridden and leaf not in variants.CONV1D_NAMES:
            layouts[name] = False  # the default flag on a layer no built-in model makes a Conv1D
            continue
        if overridden:
            why = f"fan_in_fan_out={str(flag).lower()} is contradicted by {overridden[0][0]}, so it cannot be trusted here"
        else:
            why = f"fan_in_fan_out={str(flag).lower()} cannot be checked against it (PEFT would follow the layer's class, not the flag)"
        message = (
            "square layer: nothing tells whether it is a Conv1D or an nn.Linear (no config.json naming a built-in "
            f"model type), and {why}; merge from the model directory with its config.json"
        )
        problems.append(Problem("fan-in-fan-out-undecidable", f"{label}{spec.PREFIX}{name}", message))
    return layouts, problems
