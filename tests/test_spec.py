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


def test_role_keys_match_whole_keys_only():
    key = "base_model.model.model.layers.0.q_proj.lora_A.weight"
    assert spec.split_key(key + "\n") is None  # "$" would match before the newline; PEFT sees no lora_A
    assert spec.split_key(key + "\nx") is None
    assert spec.split_key(key) == ("model.layers.0.q_proj", "lora_A.weight")


BASE_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("lora_alpha", math.inf, "finite number > 0, got inf"),
        ("lora_alpha", -math.inf, "finite number > 0"),
        ("lora_alpha", math.nan, "finite number > 0, got nan"),
        ("lora_alpha", 10**400, "an integer of 401 digits"),
        ("r", 10**400, "integer >= 1, got an integer of 401 digits"),
        ("r", math.inf, "integer >= 1, got inf"),
        ("alpha_pattern", {"q_proj": math.inf}, "alpha_pattern.q_proj: "),
        ("rank_pattern", {"q_proj": 10**400}, "rank_pattern.q_proj: "),
        ("rank_pattern", {"(?i)q_proj": 4}, "as PEFT embeds it"),
        ("alpha_pattern", {"(" * 5000 + ")" * 5000: 4}, "not a valid regular expression"),
        ("target_modules", "(" * 5000 + ")" * 5000, "not a valid regular expression"),
    ],
)
def test_numbers_and_patterns_are_checked_for_range_and_peft_form(field, value, needle):
    problems = spec.config_problems({**BASE_CONFIG, field: value})
    assert any(needle in f"{where}: {message}" for where, message in problems), problems
    assert all(len(message) < 200 for _, message in problems)


def test_inline_flag_at_the_start_of_a_target_regex_is_fine():
    assert spec.config_problems({**BASE_CONFIG, "target_modules": "(?i).*Q_PROJ"}) == []
    assert spec.targets({"target_modules": "(?i).*Q_PROJ"}, "model.layers.0.q_proj")


def test_lone_surrogates_in_any_config_string_are_named():
    config = {**BASE_CONFIG, "base_model_name_or_path": "m\udc00", "extra": {"k": ["ok", "\ud800"]}, "emoji": "\U0001f600"}
    assert sorted(spec.config_problems(config)) == [
        ("base_model_name_or_path", "holds a lone surrogate escape (\\ud800-\\udfff): not Unicode text"),
        ("extra.k.1", "holds a lone surrogate escape (\\ud800-\\udfff): not Unicode text"),
    ]
