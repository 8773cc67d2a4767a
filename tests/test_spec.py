import json
import math
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists

from loratools import spec

from .factories import GiB, in_subprocess

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


SELECTORS = st.one_of(
    st.none(), st.lists(st.text(alphabet="ab.", max_size=4), min_size=1, max_size=4), st.sampled_from(["a.*", r".*\.b", "a|b", "(a|b)+"])
)


@settings(max_examples=300, deadline=None)
@given(
    SELECTORS.filter(lambda t: t is not None),
    SELECTORS,
    st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "a.b", "a|b"]), min_size=1, max_size=2)),
    st.lists(st.text(alphabet="ab.", max_size=8), max_size=8),
)
def test_targeted_agrees_with_peft(target, exclude, saved, names):
    # peft 0.21.2 check_target_module_exists (no layers_to_transform); an excluded module is falsy there
    config = {"target_modules": target, "exclude_modules": exclude, "modules_to_save": saved}
    peft_config = SimpleNamespace(**config, target_parameters=None, layers_to_transform=None, layers_pattern=None)
    assert spec.targeted(config, names) == [bool(check_target_module_exists(peft_config, n)) for n in names]


def test_all_linear_in_any_case_selects_everything():
    assert spec.targeted({"target_modules": "ALL-Linear"}, ["a", "b.c"]) == [True, True]  # PEFT lowercases it


def test_100k_modules_with_1000_pattern_keys_are_linear_under_1_gib():
    code = """
    import time
    from loratools import spec
    projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projs += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{i // 7}.{projs[i % 7]}" for i in range(100_000)]
    config = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": list(names),  # what loratools itself writes for an adapter it refits
        "rank_pattern": {n: 4 for n in names[::100]},  # EVA style: plain module names, "." unescaped
        "alpha_pattern": {"^" + n.replace(".", "\\\\.") : 2 for n in names[::100]},  # loratools' own anchored form
    }
    start = time.process_time()
    ranks, alphas, chosen = spec.module_ranks(config, names), spec.module_alphas(config, names), spec.targeted(config, names)
    result = {"ranks": ranks.count(4), "alphas": alphas.count(2.0), "targeted": sum(chosen), "cpu": time.process_time() - start}
    result["first"] = [ranks[0], ranks[1], alphas[0], alphas[100], alphas[101]]
    """
    result, rss = in_subprocess(code)
    assert result["targeted"] == 100_000
    assert result["ranks"] == 1000 and result["alphas"] == 1000  # each key matches exactly its own module
    assert result["first"] == [4, 8, 2.0, 2.0, 16.0]
    assert rss < GiB
    print(f"100k modules x 1000 keys: {result['cpu']:.1f} s CPU, peak RSS {rss / 2**20:.0f} MiB")
