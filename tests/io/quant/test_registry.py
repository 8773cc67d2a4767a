"""The registry: which base tensors a codec claims, and which look quantized but no codec handles."""

from __future__ import annotations

from loratools.io.quant.registry import qconfig_of, scan
from loratools.io.tensorfile import TensorInfo


def _t(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, 0, 0)


def _tensors(*infos: TensorInfo) -> dict[str, TensorInfo]:
    return {t.name: t for t in infos}


def test_fp8_block_claimed_with_its_companion():
    tensors = _tensors(_t("a.weight", "F8_E4M3", (256, 128)), _t("a.weight_scale_inv", "F32", (2, 1)), _t("n.weight", "BF16", (128,)))
    found = scan({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, tensors)
    assert list(found.params) == ["a.weight"]
    assert found.params["a.weight"].codec == "fp8-block"
    assert found.is_companion("a.weight_scale_inv") and not found.is_companion("a.weight")
    assert not found.unhandled and found.refusal("a.weight") is None


def test_compressed_tensors_found_without_a_config():
    tensors = _tensors(_t("a.weight", "F8_E4M3", (4, 8)), _t("a.weight_scale", "BF16", (4, 1)), _t("a.input_scale", "F32", (1,)))
    found = scan(None, tensors)
    assert found.params["a.weight"].codec == "fp8-tensor"
    assert set(found.stored) == {"a.weight", "a.weight_scale", "a.input_scale"}


def test_unhandled_formats_are_refused_by_their_logical_key():
    tensors = _tensors(
        _t("g.qweight", "I32", (16, 64)),
        _t("g.qzeros", "I32", (1, 8)),
        _t("g.scales", "F16", (1, 64)),
        _t("x.weight", "F8_E5M2", (4, 4)),
        _t("e.gate_up_proj_blocks", "U8", (2, 8, 1, 16)),
        _t("b.weight", "U8", (32, 1)),
        _t("b.weight.absmax", "F32", (4,)),
    )
    found = scan({"quantization_config": {"quant_method": "gptq"}}, tensors)
    assert set(found.unhandled) == {"g.weight", "x.weight", "e.gate_up_proj", "b.weight"}
    problem = found.refusal("g.weight")
    assert problem is not None and problem.code == "base-quant-unsupported"
    assert "has qweight, quant_method 'gptq'" in problem.message and "never added to stored quantized values" in problem.message
    assert found.is_companion("g.qzeros") and not found.is_companion("x.weight")
    dtype_only = found.refusal("x.weight")
    assert dtype_only is not None and dtype_only.code == "base-dtype-unsupported" and "stored as F8_E5M2" in dtype_only.message


def test_malformed_claim_is_unhandled():
    tensors = _tensors(_t("a.weight", "F8_E4M3", (256, 128)), _t("a.weight_scale_inv", "F32", (3, 1)))
    found = scan({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, tensors)
    assert not found.params and [p.code for p in found.problems] == ["base-quant-malformed"]
    assert "a.weight" in found.unhandled
    assert found.refusal("a.weight") == found.problems[0]


def test_qconfig_in_text_config():
    assert qconfig_of({"text_config": {"quantization_config": {"quant_method": "fp8"}}}) == {"quant_method": "fp8"}
    assert qconfig_of({"quantization_config": "fp8"}) is None
