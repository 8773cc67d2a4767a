"""GGUF export: read back with gguf's own GGUFReader, ΔW under llama.cpp's rule equals PEFT's, per tensor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import loratools
from loratools.errors import ArgumentError, FormatError
from loratools.formats.gguf import write
from tests.conftest import peft_adapter, tiny_llama
from tests.factories import random_module

gguf = pytest.importorskip("gguf")


def llama_cpp_deltas(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """ΔW per base tensor as llama.cpp computes it: alpha/rank · B·A, rank = b->ne[0] (llama-adapter.h get_scale)."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in reader.tensors}
    by_ne = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    alpha = float(fields["adapter.lora.alpha"])
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            stem = name.removesuffix(".lora_a")
            A, B = tensors[name], tensors[stem + ".lora_b"]
            rank = by_ne[stem + ".lora_b"][0]
            assert by_ne[name] == [A.shape[1], rank]  # ne is the numpy shape reversed: a is [in, r]
            out[stem] = (alpha / rank if alpha else 1.0) * (B @ A)
    return out, fields


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: rows (head, half, i) -> (head, i, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def peft_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT itself computes it (LoraLayer.get_delta_weight)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(tiny_llama(), str(adapter_dir))
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").double()
    return out


def gguf_name(module: str) -> str:
    layer, proj = module.split(".")[2], module.rsplit(".", 1)[1]
    return f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}[proj] + ".weight"


def check_exact(adapter_dir: Path, base: Path, tmp_path: Path, source: Path | None = None) -> dict[str, float]:
    """Export and compare every tensor; returns the factor ‖ΔW_gguf‖/‖ΔW_peft‖ per tensor."""
    out = write(loratools.load(source or adapter_dir), tmp_path / "a.gguf", force=False, base=base)
    got, fields = llama_cpp_deltas(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["general.architecture"] == "llama"
    want = peft_deltas(adapter_dir)
    assert set(got) == {gguf_name(m) for m in want}
    ratios = {}
    for module, delta in want.items():
        if module.endswith("q_proj"):
            delta = llama_permute(delta, 2)
        elif module.endswith("k_proj"):
            delta = llama_permute(delta, 1)
        g = got[gguf_name(module)]
        assert torch.allclose(g, delta, rtol=1e-4, atol=1e-6), module
        ratios[module] = float(g.norm() / delta.norm())
    return ratios


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        {"use_rslora": True, "r": 16, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3, "k_proj": 12}, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_export_matches_peft_under_llama_cpp_rule(tmp_path, llama_base, lora):
    ratios = check_exact(peft_adapter(tmp_path / "ad", **lora), llama_base, tmp_path)
    assert all(abs(r - 1) < 1e-4 for r in ratios.values())


def test_mixed_ranks_after_resize_are_exact(tmp_path, llama_base):
    src = peft_adapter(tmp_path / "ad", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    resized, rows = loratools.resize(loratools.load(src), energy=0.9)
    assert len({r.new_rank for r in rows}) > 1  # mixed ranks: the case llama.cpp's converter mis-scales
    loratools.save(resized, tmp_path / "resized")
    check_exact(tmp_path / "resized", llama_base, tmp_path)


def test_plain_adapter_keeps_factors_and_alpha(tmp_path, llama_base):
    src = peft_adapter(tmp_path / "ad", target_modules=["v_proj"])  # r=4, alpha=8: what convert_lora_to_gguf.py writes
    out = write(loratools.load(src), tmp_path / "a.gguf", force=False, base=llama_base)
    _, fields = llama_cpp_deltas(out)
    assert fields["adapter.lora.alpha"] == 8.0


def test_qwen2_names_without_permutation(tmp_path, llama_base):
    base = tmp_path / "qwen"
    base.mkdir()
    config = json.loads((llama_base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    src = peft_adapter(tmp_path / "ad", target_modules=["q_proj"])
    got, fields = llama_cpp_deltas(write(loratools.load(src), tmp_path / "q.gguf", force=False, base=base))
    assert fields["general.architecture"] == "qwen2"
    want = peft_deltas(src)
    for module, delta in want.items():
        assert torch.allclose(got[gguf_name(module)], delta, rtol=1e-4, atol=1e-6)  # NEOX RoPE: rows as in HF


@pytest.mark.parametrize(
    "change, match",
    [
        ({"magnitude": torch.ones(6)}, "DoRA"),
        ({"bias": torch.ones(6)}, "lora_B.bias"),
    ],
)
def test_refuses_what_llama_cpp_cannot_apply(tmp_path, llama_base, change, match):
    from dataclasses import replace

    m = replace(random_module(6, 16, 2), **change)
    adapter = loratools.Adapter({"model.layers.0.self_attn.q_proj": m}, {})
    with pytest.raises(FormatError, match=match):
        write(adapter, tmp_path / "x.gguf", force=False, base=llama_base)
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_modules_to_save_and_needs_base(tmp_path, llama_base):
    adapter = loratools.Adapter({"model.layers.0.self_attn.q_proj": random_module(16, 16, 2)}, {}, {"lm_head.weight": torch.zeros(4, 4)})
    with pytest.raises(FormatError, match="modules_to_save"):
        write(adapter, tmp_path / "x.gguf", force=False, base=llama_base)
    with pytest.raises(ArgumentError, match="--base"):
        write(adapter, tmp_path / "x.gguf", force=False)
    with pytest.raises(FormatError, match="not exported"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "num_hidden_layers": 2}))
        write(adapter, tmp_path / "x.gguf", force=False, base=bad)


@pytest.mark.parametrize(
    "arch",
    [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    ],
)
def test_every_family_names_its_tensors(tmp_path, arch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": [arch], "num_hidden_layers": 1, "num_attention_heads": 2}))
    proj = "self_attn.qkv_proj" if arch.startswith("Phi3") else "self_attn.o_proj"
    adapter = loratools.Adapter(
        {f"model.layers.0.{proj}": random_module(16, 16, 2), "model.layers.0.mlp.down_proj": random_module(16, 16, 2)}, {}
    )
    reader = gguf.GGUFReader(write(adapter, tmp_path / "a.gguf", force=False, base=base))
    want = {"attn_qkv" if arch.startswith("Phi3") else "attn_output", "ffn_down"}
    assert {t.name.split(".")[2] for t in reader.tensors} == want
