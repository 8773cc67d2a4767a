"""--weight-pattern: parsing, first-match-wins search semantics, and its effect on add and merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loratools import ArgumentError, merge
from loratools.methods import module_weights, parse_weight_pattern
from loratools.ops.combine import combine

from ..factories import dense, make_adapter, random_module

TE, UNET = "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_parse_splits_at_the_last_equals_sign():
    assert parse_weight_pattern("a=b=0.5") == ("a=b", 0.5)
    assert parse_weight_pattern(r"layers\.(1|2)\.=-2") == (r"layers\.(1|2)\.", -2.0)
    for bad in ("nope", "=1", "x=inf", "x=one", "(=1"):
        with pytest.raises(ArgumentError, match="weight pattern"):
            parse_weight_pattern(bad)


def test_first_pattern_that_searches_the_name_wins():
    names = [TE, UNET, "lora_unet_mid_block_attentions_0_proj_out"]
    got = module_weights([("_te_", 0.0), ("down_blocks", 0.5), ("unet", 2.0)], names)
    assert got == {TE: 0.0, UNET: 0.5, names[2]: 2.0}
    assert module_weights([("^unet", 3.0)], names) == {}  # search, but anchors still anchor


def test_add_applies_pattern_weights_under_every_method():
    q, k = "model.layers.0.q_proj", "model.layers.1.q_proj"
    a = make_adapter({q: random_module(seed=1), k: random_module(seed=2)})
    b = make_adapter({q: random_module(seed=3), k: random_module(seed=4)})
    exact, _ = combine(a, b, method="task_arithmetic", weights=[1.0, 0.5], weight_patterns=[(r"layers\.1\.", 0.25)])
    torch.testing.assert_close(dense(exact.modules[k]), 0.25 * (dense(a.modules[k]) + 0.5 * dense(b.modules[k])), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(exact.modules[q]), dense(a.modules[q]) + 0.5 * dense(b.modules[q]), rtol=1e-5, atol=1e-5)
    plain, _ = combine(a, b, method="ties", density=0.5, rank="full")
    scaled, _ = combine(a, b, method="ties", density=0.5, rank="full", weight_patterns=[(r"layers\.1\.", 3.0)])
    want = 3 * dense(plain.modules[k])  # both are full-rank SVD reconstructions: round-off relative to the largest entry
    torch.testing.assert_close(dense(scaled.modules[k]), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(dense(scaled.modules[q]), dense(plain.modules[q]))


def test_merge_applies_pattern_weights(tmp_path):
    from safetensors.torch import save_file

    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    save_file({f"{q}.weight": torch.zeros(6, 5), f"{v}.weight": torch.zeros(6, 5)}, str(tmp_path / "base.safetensors"))
    a = make_adapter({q: random_module(seed=1), v: random_module(seed=2)})
    merge(tmp_path / "base.safetensors", [a], out=tmp_path / "out.safetensors", weight_patterns=[("v_proj$", -0.5)])
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got[f"{v}.weight"].double(), -0.5 * dense(a.modules[v]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[f"{q}.weight"].double(), dense(a.modules[q]), rtol=1e-5, atol=1e-6)
