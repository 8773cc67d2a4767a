"""Merging into a compressed-tensors FP8 base (per-channel weight_scale, static input_scale kept)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratools import merge
from loratools.io.quant.fp8_tensor import CODEC
from loratools.io.tensorfile import DTYPE_NAMES, TensorInfo

from .test_quantized import _adapter, _delta, _llama

QCONFIG = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}


def _claim(parts: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    infos = {f"m.{r}": TensorInfo(f"m.{r}", DTYPE_NAMES[t.dtype], tuple(t.shape), 0, 0) for r, t in parts.items()}
    return CODEC.claims(QCONFIG, infos)[0]["m.weight"]


def _ct_base(path: Path) -> Path:
    model = _llama()
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    out = {}
    for key, value in state.items():
        if ".layers." in key and key.endswith("proj.weight"):
            like = {"weight": value.to(torch.float8_e4m3fn), "weight_scale": torch.ones(value.shape[0], 1, dtype=torch.bfloat16)}
            parts = CODEC.quantize(_claim(like), value.float(), (0, value.shape[0]), like)
            out[key], out[key.removesuffix("weight") + "weight_scale"] = parts["weight"], parts["weight_scale"]
            out[key.removesuffix("weight") + "input_scale"] = torch.tensor([0.5])
        else:
            out[key] = value
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QCONFIG
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_per_channel_fp8_requantized_bit_for_bit(tmp_path: Path) -> None:
    base = _ct_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter")
    result = merge(base, [adapter], out=tmp_path / "out")
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert after.keys() == before.keys()
    for key, delta in _delta(adapter).items():
        stem = key.removesuffix("weight")
        parts = {"weight": before[key], "weight_scale": before[stem + "weight_scale"], "input_scale": before[stem + "input_scale"]}
        q = _claim(parts)
        want = CODEC.quantize(q, CODEC.dequantize(q, parts) + delta, CODEC.all_rows(q), parts)
        assert torch.equal(after[key].view(torch.uint8), want["weight"].view(torch.uint8)), key
        assert torch.equal(after[stem + "weight_scale"], want["weight_scale"]), key
        assert torch.equal(after[stem + "input_scale"], parts["input_scale"])
    assert result.quantization["codecs"] == {"fp8-tensor": 14} and result.survival_total is not None
    dense = merge(base, [adapter], out=tmp_path / "dense", dtype="bf16")
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    assert not any(k.endswith(("weight_scale", "input_scale")) for k in tensors)
    assert dense.quantization["written"] == "dequantized"
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
