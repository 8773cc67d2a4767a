import json
import math
from pathlib import Path

import jsonschema
import pytest

from loratools import spec

SPEC = Path(__file__).resolve().parent.parent / "spec"
SCHEMA = json.loads((SPEC / "adapter-v1.schema.json").read_text())
VALID = sorted((SPEC / "examples" / "valid").glob("*.json"))
INVALID = sorted((SPEC / "examples" / "invalid").glob("*.json"))


def test_examples_exist():
    assert len(VALID) >= 3 and len(INVALID) >= 10


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_schema_and_code_accept_valid_examples(path):
    config = json.loads(path.read_text())
    jsonschema.validate(config, SCHEMA)
    assert spec.config_problems(config) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_schema_and_code_reject_invalid_examples(path):
    config = json.loads(path.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)
    # peft_type is checked by validate (as peft-type-unsupported), not config_problems
    if isinstance(config, dict) and config.get("peft_type") not in (None, "LORA"):
        return
    assert spec.config_problems(config) != []


def test_split_key_and_tensor_key_are_inverse():
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert spec.split_key(key) == ("model.layers.0.self_attn.q_proj", "lora_A.weight")
    assert spec.tensor_key(*spec.split_key(key)) == key
    assert spec.split_key("base_model.model.model.embed_tokens.lora_embedding_B") == ("model.embed_tokens", "lora_embedding_B")
    assert spec.split_key("base_model.model.lm_head.weight") is None


def test_pattern_rule_is_peft_first_match_in_order():
    module = "model.layers.1.self_attn.q_proj"
    assert spec.pattern_key(["v_proj", "q_proj", "layers.1.self_attn.q_proj"], module) == "q_proj"
    assert spec.pattern_key(["layers.1.self_attn.q_proj", "q_proj"], module) == "layers.1.self_attn.q_proj"
    assert spec.pattern_key(["layers.1"], module) is None  # must match up to the end
    assert spec.pattern_key(["ers.1.self_attn.q_proj"], module) is None  # only at a dot boundary


def test_module_rank_and_alpha_follow_patterns():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"^model\\.layers\\.0\\.v_proj": 2}}
    assert spec.module_rank(config, "model.layers.0.q_proj") == 4
    assert spec.module_rank(config, "model.layers.0.v_proj") == 8
    assert spec.module_alpha(config, "model.layers.0.v_proj") == 2.0
    assert spec.module_alpha(config, "x.model.layers.0.v_proj") == 16.0


def test_scaling():
    assert spec.scaling(16, 8) == 2.0
    assert spec.scaling(16, 4, rslora=True) == 8.0
    assert math.isclose(spec.scaling(1, 2, rslora=True), 1 / math.sqrt(2))


def test_targets_list_and_regex():
    assert spec.targets({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
    assert not spec.targets({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.qq_proj")
    assert spec.targets({"target_modules": r".*\.(q|v)_proj"}, "model.layers.0.v_proj")
    assert not spec.targets({"target_modules": r"(q|v)_proj"}, "model.layers.0.v_proj")


def test_version_policy():
    assert spec.version_problem(None) is None
    assert spec.version_problem("1.0") is None
    assert spec.version_problem("1.7") is None
    message = spec.version_problem("2.0")
    assert "2.0" in message and spec.SPEC_VERSION in message
    assert spec.version_problem("one") is not None


def test_config_problems_name_the_field():
    problems = dict(spec.config_problems({"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q"]}))
    assert list(problems) == ["r"] and "0" in problems["r"]
