"""Each profile's scale rule against the rule quoted from that runtime's source, with hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from loratools.errors import ArgumentError
from loratools.runtimes.profile import View
from loratools.runtimes.registry import PROFILES, RUNTIME_CHOICES, profiles

# One module as a file describes it: tensor rank 4, its own alpha 8 (an alpha_pattern entry), global
# r=8 / lora_alpha=16, kohya .alpha 8 while the file's most common .alpha is 4.
VIEW = View(name="unet.mid.attn1.to_q", rank=4, alpha=8, rslora=False, config_r=8, config_alpha=16, file_alpha=8, common_alpha=4)


@pytest.mark.parametrize(
    "runtime, rslora, want",
    [
        ("peft", False, 8 / 4),  # alpha_m / r_m (peft tuners/lora/layer.py update_layer)
        ("peft", True, 8 / 2),  # alpha_m / sqrt(r_m)
        ("transformers", True, 8 / 2),
        ("vllm", False, 16 / 8),  # lora_alpha / r, global (vllm peft_helper.py __post_init__)
        ("vllm", True, 16 / math.sqrt(8)),
        ("sglang", False, 16 / 8),  # lora_alpha / r (sglang srt/lora/lora.py)
        ("sglang", True, 16 / 8),  # use_rslora ignored
        ("llama.cpp", False, 16 / 4),  # alpha / b->ne[0] (llama-adapter.h get_scale)
        ("llama.cpp", True, 16 / 4),  # use_rslora ignored by convert_lora_to_gguf.py
        ("kohya", False, 8 / 4),  # .alpha / lora_dim (sd-scripts networks/lora.py)
        ("comfyui", False, 8 / 4),  # v[2] / mat2.shape[0] (comfy/weight_adapter/lora.py)
        ("diffusers", False, 4 / 4),  # attention module: the most common alpha
    ],
)
def test_scale_rule(runtime, rslora, want):
    view = View(**{**VIEW.__dict__, "rslora": rslora})
    assert PROFILES[runtime].scale(view) == pytest.approx(want, rel=1e-12)


def test_llama_cpp_alpha_zero_means_scale_one():
    assert PROFILES["llama.cpp"].scale(View(**{**VIEW.__dict__, "config_alpha": 0})) == 1.0


def test_diffusers_keeps_own_alpha_outside_attention():
    view = View(**{**VIEW.__dict__, "name": "unet.down_blocks.0.resnets.0.conv1"})
    assert PROFILES["diffusers"].scale(view) == 8 / 4


def test_refusals_and_limits_as_quoted():
    assert set(PROFILES["vllm"].refuses) == {"dora", "modules_to_save", "bias"} and PROFILES["vllm"].max_rank == 16
    assert {"dora", "modules_to_save", "bias"} <= set(PROFILES["llama.cpp"].refuses)
    assert "dora" not in PROFILES["comfyui"].refuses and "dora" in PROFILES["kohya"].refuses
    assert not PROFILES["peft"].refuses
    assert set(PROFILES["llama.cpp"].ignores) == {"rank_pattern", "alpha_pattern", "use_rslora"}
    assert all(p.sources for p in PROFILES.values())


def test_names():
    assert RUNTIME_CHOICES[-1] == "all" and {"peft", "vllm", "sglang", "llama.cpp", "diffusers", "kohya", "comfyui"} <= set(PROFILES)
    assert [p.name for p in profiles(["vllm", "all"])][0] == "vllm" and len(profiles(["all", "vllm"])) == len(PROFILES)
    with pytest.raises(ArgumentError, match="unknown runtime 'tgi'"):
        profiles(["tgi"])


def test_all_for_a_layout_names_its_readers():
    assert [p.name for p in profiles(["all"], layout="kohya")] == ["diffusers", "kohya", "comfyui"]
