"""Real PEFT + transformers: adapters PEFT writes validate and load; ours load in PEFT unchanged."""

import logging
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

from loratools import load, save, validate
from loratools.spec import WEIGHTS_NAME

from .conftest import peft_adapter, tiny_llama

CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "dora": {"use_dora": True},
    "regex-targets": {"target_modules": r".*\.(q_proj|down_proj)"},
    "embedding+saved": {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    "lora-bias": {"lora_bias": True},
    "trained-biases": {"bias": "all", "target_modules": ["q_proj", "o_proj"]},
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case_dir(request, tmp_path_factory):
    return peft_adapter(tmp_path_factory.mktemp(request.param), **CASES[request.param])


def test_peft_written_adapters_validate_and_load_identically(case_dir, llama_base):
    report = validate(case_dir, base=llama_base)
    if case_dir.name.startswith("lora-bias"):  # Llama's projections have no bias: PEFT cannot merge it either
        assert {p.code for p in report.problems} == {"base-bias-unmatched"}, report.problems
        assert validate(case_dir).ok
    else:
        assert report.ok, report.problems
    adapter = load(case_dir)
    with safe_open(str(case_dir / WEIGHTS_NAME), "pt") as fh:
        on_disk = {k: fh.get_tensor(k) for k in fh.keys()}
    ours = adapter.state_dict()
    assert set(ours) == set(on_disk)
    for key, tensor in on_disk.items():
        assert torch.equal(ours[key], tensor), key


def _load_in_peft(path):
    """PeftModel.from_pretrained, capturing missing/unexpected-key warnings."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("peft").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(path)).eval()
    finally:
        logging.getLogger("peft").removeHandler(handler)
    messages = records + [str(w.message) for w in caught]
    return model, [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]


def test_our_adapters_load_in_peft_with_same_outputs(case_dir, tmp_path):
    ours = save(load(case_dir), tmp_path / "ours")
    original, _ = _load_in_peft(case_dir)
    resaved, key_warnings = _load_in_peft(ours)
    assert key_warnings == []
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        a, b = original(ids).logits, resaved(ids).logits
    assert torch.equal(a, b)


def test_rewritten_per_module_ranks_load_in_peft(tmp_path, llama_base):
    """An adapter whose config we regenerate (per-module ranks) gives PEFT the right shapes and outputs."""
    from dataclasses import replace

    adapter = load(peft_adapter(tmp_path / "src"))
    name = "model.layers.1.self_attn.q_proj"
    m = adapter.modules[name]
    modules = dict(adapter.modules)
    modules[name] = replace(m, A=m.A[:2].clone(), B=m.B[:, :2].clone(), alpha=5.0)
    small = replace(adapter, modules=modules)
    path = save(small, tmp_path / "small")
    assert validate(path, base=llama_base).ok
    model, key_warnings = _load_in_peft(path)
    assert key_warnings == []
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == 2.5
    torch.testing.assert_close(layer.get_delta_weight("default"), modules[name].delta())
