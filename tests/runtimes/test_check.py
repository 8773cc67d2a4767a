"""Factors each runtime applies to real adapters, the problems reported, and the output convention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter
from loratools.errors import InvalidAdapterError
from loratools.runtimes.check import check, conform, runtime_factors
from tests.factories import dense, random_module


def rm(rank: int, **kwargs):
    """An 8 x 8 module of ``rank``."""
    return random_module(8, 8, rank, **kwargs)


Q, K, V = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")


def fitted(modules) -> Adapter:
    """An adapter whose config is what loratools writes for ``modules`` (r/alpha/patterns refit)."""
    draft = Adapter(modules, {})
    return replace(draft, config=draft.peft_config())


def mixed() -> Adapter:
    """Scale-1 modules of ranks 4, 4, 2 (what resize --energy writes): alpha = r per module."""
    return fitted({Q: rm(4, alpha=4, seed=1), K: rm(4, alpha=4, seed=2), V: rm(2, alpha=2)})


def test_mixed_ranks_factors():
    a = mixed()  # config r=4, lora_alpha=4, rank_pattern/alpha_pattern {V: 2}
    assert runtime_factors(a, "peft") == {Q: 1.0, K: 1.0, V: 1.0}
    assert runtime_factors(a, "vllm") == {Q: 1.0, K: 1.0, V: 1.0}  # lora_alpha/r = 1 for all, and all mean 1
    assert runtime_factors(a, "llama.cpp") == {Q: 1.0, K: 1.0, V: 2.0}  # 4 / 2 on the rank-2 tensor
    assert runtime_factors(a, "diffusers")[V] == 2.0  # most common .alpha 4 over rank 2
    codes = [(p.code, p.where) for p in check(a, ["all"])]  # all: the runtimes reading a PEFT adapter
    assert codes == [("runtime-misscaled", f"{V} [llama.cpp]")]
    assert [p.where for p in check(a, ["diffusers"])] == [f"{V} [diffusers]"]


def test_rslora_is_too_weak_in_sglang_and_llama_cpp():
    m = rm(16, alpha=8, rslora=True)  # scale 8/4 = 2
    a = fitted({Q: m})
    assert runtime_factors(a, "sglang")[Q] == pytest.approx(0.25)  # 8/16 instead of 8/4: 1/sqrt(16)
    assert runtime_factors(a, "llama.cpp")[Q] == pytest.approx(0.25)
    assert runtime_factors(a, "vllm")[Q] == pytest.approx(1.0)


def test_alpha_pattern_ignored_by_vllm():
    a = fitted({Q: rm(4, alpha=16), K: rm(4, alpha=4, seed=3), V: rm(4, alpha=16, seed=4)})
    assert runtime_factors(a, "vllm")[K] == pytest.approx(4.0)  # lora_alpha 16 / 4 = 4 instead of 1
    assert runtime_factors(a, "llama.cpp")[K] == pytest.approx(4.0)


def test_features_refused():
    dora = fitted({Q: replace(rm(4), magnitude=torch.ones(8))})
    codes = {p.where: p.code for p in check(dora, ["vllm", "llama.cpp", "peft", "comfyui"])}
    assert codes == {f"{Q} [vllm]": "runtime-unsupported", f"{Q} [llama.cpp]": "runtime-unsupported"}
    saved = replace(fitted({Q: rm(4)}), extra_tensors={"lm_head.weight": torch.zeros(2, 2)})
    assert [p.code for p in check(saved, ["vllm"])] == ["runtime-unsupported"]
    big = fitted({Q: random_module(8, 40, 32)})
    (limit,) = check(big, ["vllm"])
    assert (limit.code, limit.severity) == ("runtime-rank-limit", "warning") and "--max-lora-rank" in limit.message


def test_kohya_conv_exact_in_kohya_family_after_conform():
    conv = {
        "lora_unet_down_0": random_module(6, 4, 4, alpha=4, kernel=(3, 3)),
        "lora_unet_down_1": random_module(6, 4, 4, alpha=4, kernel=(3, 3), seed=1),
        "lora_unet_mid_attn1_to_q": random_module(6, 4, 2, alpha=1),
    }
    a = fitted(conv)
    assert runtime_factors(a, "diffusers")["lora_unet_mid_attn1_to_q"] == pytest.approx(4.0)  # .alpha 4 over rank 2 = 2, means 1/2
    out = conform(a, layout="kohya")
    assert {m.alpha for m in out.modules.values()} == {4.0}  # one .alpha: kohya, ComfyUI and diffusers agree
    assert check(out, ["kohya", "comfyui", "diffusers"]) == []
    for name, m in a.modules.items():
        torch.testing.assert_close(dense(out.modules[name]), dense(m))


@pytest.mark.parametrize("runtimes", [(), ("llama.cpp",), ("vllm",), ("llama.cpp", "vllm"), ("all",)])
def test_conform_keeps_every_delta_and_is_exact_where_asked(runtimes):
    rs = rm(16, alpha=8, rslora=True, seed=5)
    a = fitted({Q: rm(4, alpha=4, seed=1), K: rm(4, alpha=16, seed=2), V: rm(2, alpha=2)})
    a = replace(a, modules={**a.modules, "model.layers.1.self_attn.q_proj": rs})
    a = replace(a, config=replace(a, config={}).peft_config())
    out = conform(a, runtimes)
    assert not any(m.rslora for m in out.modules.values())
    for name, m in a.modules.items():
        torch.testing.assert_close(dense(out.modules[name]), dense(m), rtol=1e-5, atol=1e-6)
    assert check(out, runtimes) == [] if runtimes else check(out, ["vllm", "sglang", "peft"]) == []
    if {"llama.cpp", "vllm"} <= set(runtimes) or runtimes == ("all",):
        assert {m.rank for m in out.modules.values()} == {16}  # zero-padded: the only way both rules hold


def test_conform_refuses_what_no_rewrite_fixes():
    dora = fitted({Q: replace(rm(4), magnitude=torch.ones(8))})
    with pytest.raises(InvalidAdapterError, match="vllm refuses DoRA"):
        conform(dora, ("vllm",))
    assert conform(dora, ("peft",)) is dora  # plain scale-2 DoRA: nothing to rewrite


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1.0, 2.0, 4.0, 16.0]), st.booleans()), min_size=1, max_size=4),
    runtimes=st.sampled_from([(), ("llama.cpp",), ("vllm",), ("sglang", "llama.cpp"), ("all",)]),
)
def test_conform_never_changes_delta(specs, runtimes):
    modules = {f"model.layers.{i}.mlp.up_proj": rm(r, alpha=a, rslora=rs, seed=i) for i, (r, a, rs) in enumerate(specs)}
    if len({rs for _, _, rs in specs}) > 1:  # one use_rslora per adapter
        modules = {n: replace(m, rslora=False) for n, m in modules.items()}
    a = fitted(modules)
    out = conform(a, runtimes)
    for name, m in a.modules.items():
        torch.testing.assert_close(dense(out.modules[name]), dense(m), rtol=1e-5, atol=1e-5)
    assert [p for p in check(out, runtimes or ["peft", "vllm", "sglang"]) if p.severity == "error"] == []
