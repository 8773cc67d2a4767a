"""One test per validation problem: each bad input is reported with its code and a readable message."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import load, save, spec, validate
from loratools.errors import ChecksumError, FormatError, InvalidAdapterError
from loratools.io.tensorfile import header_layout_sha256, read_header
from loratools.spec import CONFIG_NAME, WEIGHTS_NAME

from .factories import random_adapter

Q = "base_model.model.model.layers.0.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def write(path, tensors=None, config=CONFIG, metadata=None):
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q}.lora_B.weight": torch.ones(16, 2)}
    save_file(tensors, path / WEIGHTS_NAME, metadata=metadata or {"format": "pt"})
    if config is not None:
        (path / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def codes(report):
    return [p.code for p in report.problems]


def test_valid_adapter_has_no_problems(tmp_path):
    report = validate(write(tmp_path / "a"))
    assert report.ok and report.problems == []


def test_missing_config(tmp_path):
    assert codes(validate(write(tmp_path / "a", config=None))) == ["config-missing"]


def test_invalid_json_config_names_line(tmp_path):
    report = validate(write(tmp_path / "a", config='{"r": 2,'))
    assert codes(report) == ["config-invalid"] and "line 1" in report.problems[0].message


def test_invalid_json_is_not_called_missing_whatever_the_path(tmp_path):
    assert codes(validate(write(tmp_path / "missing-config" / "a", config="{"))) == ["config-invalid"]


def test_schema_violations_each_named(tmp_path):
    report = validate(write(tmp_path / "a", config={"peft_type": "LORA", "r": 0, "lora_alpha": "x", "target_modules": ["q_proj"]}))
    assert [(p.code, p.where) for p in report.problems] == [("config-schema", "r"), ("config-schema", "lora_alpha")]


def test_unsupported_peft_type_is_named(tmp_path):
    report = validate(write(tmp_path / "a", config={**CONFIG, "peft_type": "IA3"}))
    assert codes(report) == ["peft-type-unsupported"] and "'IA3'" in report.problems[0].message


@pytest.mark.parametrize(
    "suffix,what",
    [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr")],
)
def test_incomplete_lycoris_modules_are_named(tmp_path, suffix, what):
    path = tmp_path / "f.safetensors"
    save_file({f"lora_unet_down_blocks_0.{suffix}": torch.ones(2, 2)}, path)
    report = validate(path)
    assert codes(report) == ["bad-shape"] and what in report.problems[0].message


def test_kohya_file_is_read_and_checked(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.ones(2, 4)}, path)
    report = validate(path)
    assert codes(report) == ["lora-b-missing"] and "lora_unet_down_blocks_0" in report.problems[0].message


def test_missing_weights_file(tmp_path):
    path = write(tmp_path / "a")
    (path / WEIGHTS_NAME).unlink()
    assert codes(validate(path)) == ["weights-missing"]


def test_pickle_is_refused_never_loaded(tmp_path):
    path = write(tmp_path / "a")
    (path / WEIGHTS_NAME).unlink()
    (path / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")  # would run code if unpickled
    report = validate(path)
    assert codes(report) == ["pickle-refused"] and "safetensors" in report.problems[0].message
    with pytest.raises(FormatError, match="pickle"):
        load(path)
    assert codes(validate(path / "adapter_model.bin")) == ["pickle-refused"]


def test_truncated_safetensors(tmp_path):
    path = write(tmp_path / "a")
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    report = validate(path)
    assert codes(report) == ["corrupt-file"] and "truncated" in report.problems[0].message


def test_a_without_b(tmp_path):
    report = validate(write(tmp_path / "a", {f"{Q}.lora_A.weight": torch.ones(2, 16)}))
    assert codes(report) == ["lora-b-missing"] and report.problems[0].where == Q


def test_b_without_a(tmp_path):
    assert codes(validate(write(tmp_path / "a", {f"{Q}.lora_B.weight": torch.ones(16, 2)}))) == ["lora-a-missing"]


def test_rank_mismatch_between_a_and_b(tmp_path):
    report = validate(write(tmp_path / "a", {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q}.lora_B.weight": torch.ones(16, 3)}))
    assert codes(report) == ["rank-mismatch"] and "rank 2" in report.problems[0].message and "rank 3" in report.problems[0].message


def test_rank_disagrees_with_config(tmp_path):
    report = validate(write(tmp_path / "a", config={**CONFIG, "r": 8}))
    assert codes(report) == ["rank-config-mismatch"] and "r=8" in report.problems[0].message


def test_rank_disagrees_with_rank_pattern(tmp_path):
    report = validate(write(tmp_path / "a", config={**CONFIG, "rank_pattern": {"q_proj": 4}}))
    assert codes(report) == ["rank-config-mismatch"]


def test_nan_and_inf(tmp_path):
    report = validate(
        write(
            tmp_path / "a",
            {f"{Q}.lora_A.weight": torch.tensor([[float("nan")] * 16] * 2), f"{Q}.lora_B.weight": torch.full((16, 2), float("inf"))},
        )
    )
    assert codes(report) == ["non-finite", "non-finite"]
    assert "32 of 32" in report.problems[0].message


def test_empty_adapter(tmp_path):
    assert codes(validate(write(tmp_path / "a", {}))) == ["empty"]


def test_future_major_version_refused_with_both_versions(tmp_path):
    report = validate(write(tmp_path / "a", metadata={"format": "pt", "loratools.spec_version": "2.0"}))
    assert codes(report) == ["spec-version"]
    assert "2.0" in report.problems[0].message and "1.0" in report.problems[0].message
    assert validate(write(tmp_path / "b", metadata={"format": "pt", "loratools.spec_version": "1.3"})).ok


def test_checksum_mismatch(tmp_path):
    save(random_adapter(1), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    report = validate(tmp_path / "a")
    assert codes(report) == ["checksum-mismatch"]
    with pytest.raises(ChecksumError, match="sha256"):
        load(tmp_path / "a")


def test_untargeted_module_would_be_ignored_by_peft(tmp_path):
    report = validate(write(tmp_path / "a", config={**CONFIG, "target_modules": ["v_proj"]}))
    assert codes(report) == ["not-targeted"]


def test_dora_flag_must_match_tensors(tmp_path):
    assert codes(validate(write(tmp_path / "a", config={**CONFIG, "use_dora": True}))) == ["dora-mismatch"]


def test_lora_bias_flag_must_match_tensors(tmp_path):
    tensors = {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q}.lora_B.weight": torch.ones(16, 2), f"{Q}.lora_B.bias": torch.ones(16)}
    assert codes(validate(write(tmp_path / "a", tensors))) == ["lora-bias-mismatch"]
    assert validate(write(tmp_path / "b", tensors, config={**CONFIG, "lora_bias": True})).ok
    assert codes(validate(write(tmp_path / "c", config={**CONFIG, "lora_bias": True}))) == ["lora-bias-mismatch"]


def test_unsupported_dtype(tmp_path):
    report = validate(
        write(tmp_path / "a", {f"{Q}.lora_A.weight": torch.ones(2, 16, dtype=torch.float64), f"{Q}.lora_B.weight": torch.ones(16, 2)})
    )
    assert codes(report) == ["dtype-unsupported"]


def test_unexpected_tensor_is_a_warning(tmp_path):
    path = write(tmp_path / "a", {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q}.lora_B.weight": torch.ones(16, 2), "stray": torch.ones(1)})
    report = validate(path)
    assert report.ok and codes(report) == ["unexpected-tensor"]


def test_every_problem_reported_at_once(tmp_path):
    tensors = {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q.replace('q_proj', 'k_proj')}.lora_A.weight": torch.full((2, 16), float("nan"))}
    report = validate(write(tmp_path / "a", tensors, config={**CONFIG, "target_modules": ["q_proj", "k_proj"]}))
    assert sorted(codes(report)) == ["lora-b-missing", "lora-b-missing", "non-finite"]
    with pytest.raises(InvalidAdapterError, match="2 more problem"):
        load(tmp_path / "a")


def test_base_matching(tmp_path, llama_base):
    good = write(tmp_path / "good")
    assert validate(good, base=llama_base).ok
    bad_shape = write(tmp_path / "shape", {f"{Q}.lora_A.weight": torch.ones(2, 15), f"{Q}.lora_B.weight": torch.ones(16, 2)})
    report = validate(bad_shape, base=llama_base)
    assert codes(report) == ["base-shape-mismatch"] and "[16, 15]" in report.problems[0].message
    ghost = "base_model.model.model.layers.9.self_attn.q_proj"
    unmatched = write(tmp_path / "ghost", {f"{ghost}.lora_A.weight": torch.ones(2, 16), f"{ghost}.lora_B.weight": torch.ones(16, 2)})
    report = validate(unmatched, base=llama_base)
    assert codes(report) == ["base-unmatched"] and report.problems[0].where == ghost


def test_base_matching_is_fan_in_fan_out_aware(tmp_path, llama_base):
    # Llama's v_proj is an nn.Linear stored (8, 16): PEFT ignores fan_in_fan_out=true there with a
    # warning (tests/test_planner_variants.py has the rule's cases), so the plan does too
    v = Q.replace("q_proj", "v_proj")
    tensors = {f"{v}.lora_A.weight": torch.ones(2, 16), f"{v}.lora_B.weight": torch.ones(8, 2)}
    assert validate(write(tmp_path / "plain", tensors, config={**CONFIG, "target_modules": ["v_proj"]}), base=llama_base).ok
    fifo = write(tmp_path / "fifo", tensors, config={**CONFIG, "target_modules": ["v_proj"], "fan_in_fan_out": True})
    report = validate(fifo, base=llama_base)
    assert report.ok and codes(report) == ["fan-in-fan-out-overridden"]


def test_unreadable_base(tmp_path):
    report = validate(write(tmp_path / "a"), base=tmp_path / "nope")
    assert codes(report) == ["base-unreadable"]
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(3, 2)}, kohya)
    assert codes(validate(kohya, base=tmp_path / "nope")) == ["base-unreadable"]


def test_validate_an_adapter_object():
    assert validate(random_adapter(2)).ok


def test_bare_file_with_config_beside_it(tmp_path):
    path = write(tmp_path / "a")
    assert validate(path / WEIGHTS_NAME).ok
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(path / WEIGHTS_NAME, lonely)
    assert codes(validate(lonely)) == ["config-missing"]


def test_rewritten_by_another_tool_is_a_warning_not_corruption(tmp_path):
    path = save(random_adapter(2), tmp_path / "a.safetensors")
    tensors, meta = load_file(path), read_header(path).metadata
    assert meta[spec.META_LAYOUT] == header_layout_sha256(read_header(path))
    save_file(tensors, tmp_path / "same.safetensors", metadata=meta)  # a plain round trip keeps the data: still verified
    assert validate(tmp_path / "same.safetensors").problems == []
    halved = {k: v.half() for k, v in tensors.items()}  # another tool rewrote the tensors, metadata copied verbatim
    save_file(halved, tmp_path / "b.safetensors", metadata=meta)
    report = validate(tmp_path / "b.safetensors")
    assert report.ok and codes(report) == ["checksum-not-applicable"]
    assert "rewritten since loratools wrote it" in report.problems[0].message
    # same table, other bytes: that is corruption
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    assert codes(validate(tmp_path / "c.safetensors")) == ["checksum-mismatch"]


def test_trainable_tokens_are_what_peft_loads(tmp_path):
    tokens = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    tensors = {f"{Q}.lora_A.weight": torch.ones(2, 16), f"{Q}.lora_B.weight": torch.ones(16, 2), tokens: torch.ones(2, 16)}
    assert validate(write(tmp_path / "a", tensors, {**CONFIG, "trainable_token_indices": [1, 2]})).problems == []
    assert codes(validate(write(tmp_path / "b", tensors))) == ["unexpected-tensor"]  # no indices: PEFT ignores it


def test_ensure_weight_tying_targets_the_tied_head(tmp_path):
    head = "base_model.model.lm_head"
    tensors = {f"{head}.lora_A.weight": torch.ones(2, 16), f"{head}.lora_B.weight": torch.ones(64, 2)}
    config = {**CONFIG, "target_modules": ["embed_tokens"]}
    assert codes(validate(write(tmp_path / "a", tensors, config))) == ["not-targeted"]
    assert validate(write(tmp_path / "b", tensors, {**config, "ensure_weight_tying": True})).problems == []


@pytest.mark.parametrize(
    ("field", "config"),
    [
        ("target_modules", {**CONFIG, "target_modules": "(.*a){25}"}),
        ("rank_pattern", {**CONFIG, "target_modules": ["a" * 60 + "b"], "rank_pattern": {"(a+)+$": 2}}),
        ("alpha_pattern", {**CONFIG, "target_modules": ["a" * 60 + "b"], "alpha_pattern": {"(a|aa)+c": 2}}),
    ],
)
def test_runaway_pattern_is_a_problem_with_its_own_code(tmp_path, field, config):
    module = "base_model.model." + "a" * 60 + "b"  # a long name the pattern backtracks on
    tensors = {f"{module}.lora_A.weight": torch.ones(2, 4), f"{module}.lora_B.weight": torch.ones(4, 2)}
    report = validate(write(tmp_path / "a", tensors, config))
    bad = [p for p in report.problems if p.code == "pattern-too-slow"]
    assert codes(report) == ["pattern-too-slow"] and bad[0].where == field and bad[0].message.startswith("pattern ")
    with pytest.raises(InvalidAdapterError, match=f": {field}: pattern .* takes over 1 s .*backtracking[^(]*$"):
        load(tmp_path / "a")
