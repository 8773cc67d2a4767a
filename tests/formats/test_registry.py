"""Format detection: which reader a path gets, what is refused before any reader runs, which writer an output gets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from loratools import spec
from loratools.errors import FormatError, SpecError
from loratools.formats import diffusers, gguf, mlx, peft, registry
from loratools.formats.registry import WRITERS, read_raw, writer

A_KEY = "base_model.model.layers.0.q.lora_A.weight"
B_KEY = "base_model.model.layers.0.q.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
TENSORS = {A_KEY: torch.ones(2, 3), B_KEY: torch.full((4, 2), 0.5)}


def _peft_dir(path, config=CONFIG):
    path.mkdir()
    save_file(TENSORS, path / spec.WEIGHTS_NAME)
    (path / spec.CONFIG_NAME).write_text(json.dumps(config))
    return path


def test_peft_directory(tmp_path):
    raw = read_raw(_peft_dir(tmp_path / "a"))
    assert raw.config == CONFIG and raw.config_error is None and raw.source == str(tmp_path / "a")
    assert sorted(raw.tensors) == sorted(TENSORS) and torch.equal(raw.tensors[B_KEY], TENSORS[B_KEY])


def test_bare_file_reads_its_embedded_config_before_one_beside_it(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors", metadata={spec.META_CONFIG: json.dumps({**CONFIG, "r": 2, "lora_alpha": 8})})
    (tmp_path / spec.CONFIG_NAME).write_text(json.dumps(CONFIG))
    assert read_raw(tmp_path / "x.safetensors").config["lora_alpha"] == 8


def test_missing_and_broken_configs_are_reported_not_raised(tmp_path):
    path = _peft_dir(tmp_path / "a")
    (path / spec.CONFIG_NAME).unlink()
    raw = read_raw(path)
    assert raw.config is None and raw.config_error_code == "config-missing" and "needs its adapter_config.json" in raw.config_error
    (path / spec.CONFIG_NAME).write_text('{"r": 2,')
    raw = read_raw(path)
    assert raw.config_error_code == "config-invalid" and "not valid JSON" in raw.config_error and "line 1" in raw.config_error


def test_kohya_and_diffusers_files_are_recognised(tmp_path):
    save_file(
        {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, tmp_path / "k.safetensors"
    )
    assert read_raw(tmp_path / "k.safetensors").metadata[spec.META_SOURCE] == "kohya"
    (tmp_path / "d").mkdir()
    save_file(
        {"unet.x.lora_A.weight": torch.ones(2, 3), "unet.x.lora_B.weight": torch.ones(4, 2)}, tmp_path / "d" / spec.DIFFUSERS_WEIGHTS_NAME
    )
    raw = read_raw(tmp_path / "d")
    assert raw.metadata[spec.META_SOURCE] == "diffusers" and sorted(raw.tensors) == [
        "base_model.model.unet.x.lora_A.weight",
        "base_model.model.unet.x.lora_B.weight",
    ]


def test_pickles_are_refused_without_being_opened(tmp_path):
    bomb = tmp_path / "adapter.bin"
    bomb.write_bytes(b"\x80\x04cos\nsystem\n")
    with pytest.raises(FormatError, match="pickle") as info:
        read_raw(bomb)
    assert info.value.code == "pickle-refused"


def test_lone_tucker_core_is_refused_by_name(tmp_path):
    key = "lora_unet_x.lora_mid.weight"
    save_file({key: torch.ones(2, 2)}, tmp_path / "l.safetensors")
    with pytest.raises(FormatError, match="lora_mid without lora_down") as info:
        read_raw(tmp_path / "l.safetensors")
    assert info.value.code == "bad-shape" and info.value.key == key


def test_writers_cover_every_output_format():
    assert set(WRITERS) == set(spec.FORMATS)
    assert writer("peft") is peft.write and writer("gguf") is gguf.write
    assert writer("kohya") is registry._write_kohya  # kohya.write, once Flux/SD3 projections are fused back
    assert writer("diffusers") is diffusers.write and writer("mlx") is mlx.write
    with pytest.raises(SpecError, match="unknown output format 'onnx'; choose one of peft, kohya, diffusers, gguf, mlx"):
        writer("onnx")
