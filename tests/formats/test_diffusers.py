"""diffusers LoRA files: the four key layouts, alpha from tensors or lora_adapter_metadata, directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loratools
from loratools.errors import FormatError
from loratools.spec import DIFFUSERS_WEIGHTS_NAME

DOWN = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # A: rank 2, in 3
UP = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # B: out 2, rank 2
DENSE = UP @ DOWN  # [[1, 2, 0], [0, 2, 0]]


@pytest.mark.parametrize(
    ("down_key", "up_key", "module"),
    [
        (
            "unet.mid_block.attentions.0.proj_in.lora_A.weight",
            "unet.mid_block.attentions.0.proj_in.lora_B.weight",
            "unet.mid_block.attentions.0.proj_in",
        ),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        ),
        (
            "unet.down_blocks.0.resnets.0.conv1.lora.down.weight",
            "unet.down_blocks.0.resnets.0.conv1.lora.up.weight",
            "unet.down_blocks.0.resnets.0.conv1",
        ),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        ),
    ],
)
def test_layouts_map_to_module_paths_with_scale_one(tmp_path, down_key, up_key, module):
    path = tmp_path / "lora.safetensors"
    save_file({down_key: DOWN, up_key: UP}, str(path))
    adapter = loratools.load(path)
    assert list(adapter.modules) == [module]
    assert adapter.modules[module].scale == 1.0  # no alpha: diffusers applies B·A as is
    assert torch.equal(adapter.modules[module].delta(), DENSE)
    assert adapter.metadata["loratools.source_format"] == "diffusers"
    assert loratools.source_format(adapter) == "diffusers"  # written back in its own layout


def test_alpha_tensor_and_adapter_metadata(tmp_path):
    save_file(
        {"unet.a.lora.down.weight": DOWN, "unet.a.lora.up.weight": UP, "unet.a.alpha": torch.tensor(1.0)}, str(tmp_path / "a.safetensors")
    )
    assert loratools.load(tmp_path / "a.safetensors").modules["unet.a"].scale == 0.5
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 8, "unet.alpha_pattern": {"b": 4}})}
    tensors = {f"unet.{m}.lora_{r}.weight": t.clone() for m in ("a", "b") for r, t in (("A", DOWN), ("B", UP))}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    adapter = loratools.load(tmp_path / "m.safetensors")
    assert (adapter.modules["unet.a"].scale, adapter.modules["unet.b"].scale) == (4.0, 2.0)


def test_pipeline_directory_and_half_modules(tmp_path):
    (tmp_path / "pipe").mkdir()
    save_file({"unet.a.lora_A.weight": DOWN, "unet.a.lora_B.weight": UP}, str(tmp_path / "pipe" / DIFFUSERS_WEIGHTS_NAME))
    assert list(loratools.load(tmp_path / "pipe").modules) == ["unet.a"]
    save_file({"unet.a.lora_A.weight": DOWN}, str(tmp_path / "half.safetensors"))
    with pytest.raises(FormatError, match=r"no lora_B \(lora_up/up\)"):
        loratools.load(tmp_path / "half.safetensors")


def test_plain_peft_file_without_config_is_still_reported_missing_config(tmp_path):
    save_file({"base_model.model.a.lora_A.weight": DOWN, "base_model.model.a.lora_B.weight": UP}, str(tmp_path / "p.safetensors"))
    assert loratools.validate(tmp_path / "p.safetensors").problems[0].code == "config-missing"
