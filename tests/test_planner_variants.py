"""The planner on PEFT variants whose meaning is not a plain ΔW: residual inits, aLoRA, layer_replication, fan_in_fan_out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratools import spec, variants
from loratools.adapter import Adapter
from loratools.api import save_as
from loratools.errors import SpecError
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.arith import add, resize, scale
from loratools.planner import plan
from loratools.validation import validate

from .factories import random_module

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def _checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> Path:
    """A base of zeros with the given weight shapes: a model directory when ``config`` is given, else one file."""
    tensors = {k: torch.zeros(s) for k, s in shapes.items()}
    if config is None:
        save_file(tensors, path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _adapter(modules: dict[str, tuple[int, int]], **config) -> Adapter:
    """Modules name -> (out, in), rank 2, alpha 4."""
    mods = {n: random_module(out, inp, 2, alpha=4.0, seed=i) for i, (n, (out, inp)) in enumerate(modules.items())}
    targets = sorted({n.rsplit(".", 1)[1] for n in mods})
    return Adapter(mods, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets, **config})


def _codes(problems) -> list[tuple[str, str]]:
    return [(p.code, p.severity) for p in problems]


@pytest.mark.parametrize(
    ("init", "family"),
    [("pissa", "pissa"), ("pissa_niter_4", "pissa"), ("olora", "olora"), ("OLoRA", "olora"), ("corda", "corda"), ("loftq", "loftq")]
    + [(v, None) for v in (True, False, "gaussian", "eva", "orthogonal", "mica", "lora_ga")],
)
def test_residual_init_families(init, family):
    assert variants.residual_init({"init_lora_weights": init}) == family


VARIANT_CONFIGS = {
    "residual-init": {"init_lora_weights": "pissa_niter_4"},  # randomized: not rebuilt (plain pissa and olora are)
    "alora-unmergeable": {"alora_invocation_tokens": [5, 6]},
    "layer-replication": {"layer_replication": [[0, 1], [0, 1]]},
}


@pytest.mark.parametrize("code", sorted(VARIANT_CONFIGS))
def test_variants_are_one_error_and_no_edit(tmp_path, code):
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8)})
    result = plan(open_checkpoint(base), [_adapter({Q: (8, 8)}, **VARIANT_CONFIGS[code])])
    assert _codes(result.problems) == [(code, "error")] and not result.ok and result.edits == {}
    assert "\n" not in result.problems[0].message


def test_variant_messages_say_what_works():
    messages = {code: variants.variant_problems(config)[0][2] for code, config in VARIANT_CONFIGS.items()}
    assert "path_initial_model_for_weight_conversion" in messages["residual-init"]
    assert "PEFT refuses to merge it too" in messages["alora-unmergeable"] and "unmerged" in messages["alora-unmergeable"]
    assert "expanded checkpoint" in messages["layer-replication"]
    assert "LoftQ backbone" in variants.variant_problems({"init_lora_weights": "loftq"})[0][2]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_plan_a_residual_on_each_tensor(tmp_path, init):
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8)})
    result = plan(open_checkpoint(base), [_adapter({Q: (8, 8)}, init_lora_weights=init)])
    residual = result.edits[f"{Q}.weight"].residual
    assert result.ok and residual is not None and residual.family == init and residual.rank == 2 and residual.scale == 2.0
    two = plan(open_checkpoint(base), [_adapter({Q: (8, 8)}, init_lora_weights=init), _adapter({Q: (8, 8)})])
    assert [p.code for p in two.errors] == ["residual-shared"]


def test_converted_residual_adapter_is_plain_lora(tmp_path):
    # PEFT's weight conversion writes init_lora_weights=true and r doubled: an ordinary LoRA
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8)})
    assert plan(open_checkpoint(base), [_adapter({Q: (8, 8)}, init_lora_weights=True)]).ok


def test_plain_validate_warns_and_base_validate_refuses(tmp_path):
    adapter = _adapter({Q: (8, 8)}, alora_invocation_tokens=[5])
    assert _codes(validate(adapter).problems) == [("alora-unmergeable", "warning")] and validate(adapter).ok
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8)})
    report = validate(adapter, base=base)
    assert _codes(report.problems) == [("alora-unmergeable", "error")] and not report.ok


GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
ATTN = "transformer.h.0.attn"


def _orient(base: Path, adapter: Adapter):
    result = plan(open_checkpoint(base), [adapter])
    return {e.key: e.terms[0].transposed for e in result.edits.values()}, _codes(result.problems), result


def test_gpt2_square_c_proj_with_false_flag_is_conv1d_from_config(tmp_path):
    # GPT-2 stores Conv1D weights in x out: c_attn 8 -> 24 is (8, 24), c_proj 8 -> 8 is square
    base = _checkpoint(tmp_path / "base", {f"{ATTN}.c_attn.weight": (8, 24), f"{ATTN}.c_proj.weight": (8, 8)}, GPT2)
    transposed, codes, result = _orient(base, _adapter({f"{ATTN}.c_proj": (8, 8)}, fan_in_fan_out=False))
    assert transposed == {f"{ATTN}.c_proj.weight": True} and codes == [("fan-in-fan-out-overridden", "warning")] and result.ok
    assert "PEFT overrides" in result.problems[0].message and "gpt2 builds it as a Conv1D" in result.problems[0].message


def test_llama_square_q_proj_with_true_flag_is_linear_from_config(tmp_path):
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8), f"{V}.weight": (4, 8)}, {"model_type": "llama"})
    transposed, codes, _ = _orient(base, _adapter({Q: (8, 8), V: (4, 8)}, fan_in_fan_out=True))
    assert transposed == {f"{Q}.weight": False, f"{V}.weight": False} and codes == [("fan-in-fan-out-overridden", "warning")]


def test_matching_flag_gives_no_warning(tmp_path):
    base = _checkpoint(tmp_path / "base", {f"{ATTN}.c_proj.weight": (8, 8)}, GPT2)
    transposed, codes, _ = _orient(base, _adapter({f"{ATTN}.c_proj": (8, 8)}, fan_in_fan_out=True))
    assert transposed == {f"{ATTN}.c_proj.weight": True} and codes == []


def test_without_config_non_square_shape_decides_and_square_is_refused(tmp_path):
    # a single file names no model type: c_attn's (in, out) storage shows it is a Conv1D, contradicting the flag,
    # so the flag cannot be trusted for the square c_proj either
    base = _checkpoint(tmp_path / "base", {f"{ATTN}.c_attn.weight": (8, 24), f"{ATTN}.c_proj.weight": (8, 8)})
    adapter = _adapter({f"{ATTN}.c_attn": (24, 8), f"{ATTN}.c_proj": (8, 8)}, fan_in_fan_out=False)
    transposed, codes, result = _orient(base, adapter)
    assert codes == [("fan-in-fan-out-overridden", "warning"), ("fan-in-fan-out-undecidable", "error")]
    assert result.problems[1].where == f"{spec.PREFIX}{ATTN}.c_proj" and not result.ok


@pytest.mark.parametrize(
    ("leaf", "flag", "ok"),
    [("q_proj", False, True), ("q_proj", True, False), ("c_proj", False, False), ("c_proj", True, False)],
)
def test_square_layer_of_unknown_model(tmp_path, leaf, flag, ok):
    # only the default flag on a name no built-in model makes a Conv1D is taken as an nn.Linear
    name = f"model.layers.0.attn.{leaf}"
    for config in (None, {"model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}):
        where = tmp_path / f"{config is None}"
        _, codes, result = _orient(_checkpoint(where, {f"{name}.weight": (8, 8)}, config), _adapter({name: (8, 8)}, fan_in_fan_out=flag))
        assert result.ok == ok and codes == ([] if ok else [("fan-in-fan-out-undecidable", "error")])


def test_arith_carries_alora_and_replication_and_refuses_mixes():
    alora = _adapter({Q: (8, 8)}, alora_invocation_tokens=[5, 6])
    assert scale(alora, 0.5).config["alora_invocation_tokens"] == [5, 6]
    assert add(alora, alora).config["alora_invocation_tokens"] == [5, 6]
    assert resize(alora, 1)[0].config["alora_invocation_tokens"] == [5, 6]
    with pytest.raises(SpecError, match="disagree on alora_invocation_tokens"):
        add(alora, _adapter({Q: (8, 8)}))
    replicated = _adapter({Q: (8, 8)}, layer_replication=[[0, 1], [0, 1]])
    assert scale(replicated, 2.0).config["layer_replication"] == [[0, 1], [0, 1]]
    with pytest.raises(SpecError, match="disagree on layer_replication"):
        add(replicated, _adapter({Q: (8, 8)}, layer_replication=[[0, 1]]))


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "loftq"])
def test_arith_refuses_residual_inits(init):
    residual = _adapter({Q: (8, 8)}, init_lora_weights=init)
    for op in (lambda: scale(residual, 2.0), lambda: add(residual, residual), lambda: resize(residual, 1)):
        with pytest.raises(SpecError, match="cannot be combined or resized"):
            op()


@pytest.mark.parametrize("code", sorted(VARIANT_CONFIGS))
def test_kohya_output_refuses_what_it_cannot_carry(tmp_path, code):
    with pytest.raises(SpecError, match="kohya file cannot carry"):
        save_as(_adapter({Q: (8, 8)}, **VARIANT_CONFIGS[code]), tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_unconverted_lora_ga_merges_as_peft_loads_it_with_a_warning(tmp_path):
    # PEFT keeps the original base when it loads a LoRA-GA adapter, so W + ΔW is its inference
    base = _checkpoint(tmp_path / "base", {f"{Q}.weight": (8, 8)})
    result = plan(open_checkpoint(base), [_adapter({Q: (8, 8)}, init_lora_weights="lora_ga")])
    assert result.ok and _codes(result.problems) == [("lora-ga-unconverted", "warning")] and list(result.edits) == [f"{Q}.weight"]
    assert _codes(validate(_adapter({Q: (8, 8)}, init_lora_weights="lora_ga")).problems) == [("lora-ga-unconverted", "warning")]
