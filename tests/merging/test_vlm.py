"""Text LoRAs on VLMs under transformers 5, whose checkpoints name the text model differently.

PEFT names modules ``model.language_model.layers...``; LLaVA and Gemma 3 checkpoints store
``language_model.model.layers...`` and Qwen2-VL ones ``model.layers...``.  The reference is the
unmerged PeftModel's logits on text-only input.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import loratools
from loratools import merge

IDS = torch.tensor([[1, 5, 9, 2, 33, 7]])
TEXT = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 8, "patch_size": 4}


def llava() -> transformers.PretrainedConfig:
    return transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT).to_dict(),
        vision_config={"model_type": "clip_vision_model", **VISION},
        image_token_index=63,
    )


def gemma3() -> transformers.PretrainedConfig:
    return transformers.Gemma3Config(
        text_config={"model_type": "gemma3_text", **TEXT, "head_dim": 8},
        vision_config={"model_type": "siglip_vision_model", **VISION},
        mm_tokens_per_image=4,
        image_token_index=63,
        boi_token_index=61,
        eoi_token_index=62,
    )


def qwen2_vl() -> transformers.PretrainedConfig:
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2, "temporal_patch_size": 1}
    text = {"model_type": "qwen2_vl_text", **TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    return transformers.Qwen2VLConfig(
        text_config=text, vision_config={**vision, "spatial_merge_size": 1}, image_token_id=63, video_token_id=62, vision_start_token_id=61
    )


CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {"llava": llava, "gemma3": gemma3, "qwen2_vl": qwen2_vl}


def model(arch: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForImageTextToText.from_config(CONFIGS[arch]()).eval()


def logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=IDS).logits


@pytest.mark.parametrize("config_json", [True, False], ids=["config", "keys-only"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_text_lora_merges_into_vlm_checkpoint(tmp_path: Path, arch: str, config_json: bool) -> None:
    base = tmp_path / "base"
    model(arch).save_pretrained(base)
    torch.manual_seed(1)
    targets = ["q_proj", "v_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model(arch), LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)).save_pretrained(
            tmp_path / "adapter"
        )
        expected = logits(PeftModel.from_pretrained(model(arch), tmp_path / "adapter"))
    checked = base if config_json else base / "model.safetensors"
    if not config_json:  # the layout must then come from the keys alone
        shutil.move(base / "config.json", tmp_path / "config.json")
    report = loratools.validate(tmp_path / "adapter", base=checked)
    assert report.ok and not report.warnings, report.problems
    result = merge(
        checked, [tmp_path / "adapter"], out=tmp_path / "merged" / "model.safetensors" if not config_json else tmp_path / "merged"
    )
    if not config_json:
        shutil.copy(tmp_path / "config.json", tmp_path / "merged" / "config.json")
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged) - expected).abs().max() <= 1e-4
    assert (logits(model(arch)) - expected).abs().max() > 1e-3
    assert result.out.exists()
