"""Merging into FP8 base checkpoints: requantized bit for bit, dequantized outputs, refusals, survival."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config, LlamaForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

from loratools import InvalidAdapterError, MergeError, load, merge, unmerge
from loratools.io.checkpoint import open_checkpoint
from loratools.io.quant.base import LowRank
from loratools.io.quant.fp8_block import CODEC
from loratools.io.quant.registry import read_stored, scan
from loratools.io.tensorfile import DTYPE_NAMES, TensorInfo
from loratools.merging import quantized
from loratools.merging.quantized import Companions
from loratools.validation import check_base

from ..conftest import tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 3]])
TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj"]


def _llama(**overrides: object) -> LlamaForCausalLM:
    fields = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False, **{**fields, **overrides})).eval()


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight and F32 weight_scale_inv by the codec's rule (itself checked against transformers)."""
    grid = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    like = {"weight": w.to(torch.float8_e4m3fn), "weight_scale_inv": torch.ones(grid)}
    q = _claim(like, block)
    out = CODEC.quantize(q, w.float(), CODEC.all_rows(q), like)
    return out["weight"], out["weight_scale_inv"]


def _claim(parts: dict[str, torch.Tensor], block: tuple[int, int]):  # type: ignore[no-untyped-def]
    infos = {f"m.{r}": TensorInfo(f"m.{r}", DTYPE_NAMES[t.dtype], tuple(t.shape), 0, 0) for r, t in parts.items()}
    return CODEC.claims({"weight_block_size": list(block)}, infos)[0]["m.weight"]


def _fp8_base(path: Path, block: tuple[int, int] = (16, 16), split: bool = False, **overrides: object) -> Path:
    """A tiny Llama saved the way DeepSeek/Qwen3 FP8 checkpoints are: every decoder linear in e4m3 with block scales.

    ``split``: scales in the first shard and weights in the second (a scale is written before its weight).
    """
    model = _llama(**overrides)
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    weights, scales = {}, {}
    for key, value in state.items():
        if ".layers." in key and key.endswith("proj.weight"):
            weights[key], scales[key.removesuffix("weight") + "weight_scale_inv"] = _quantize(value, block)
        else:
            weights[key] = value
    if split:
        shards = {"model-00001-of-00002.safetensors": scales, "model-00002-of-00002.safetensors": weights}
        for name, tensors in shards.items():
            save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map = {k: n for n, tensors in shards.items() for k in tensors}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        save_file({**weights, **scales}, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _dequantized(base: Path, out: Path) -> Path:
    """The FP8 base written in float32 by the codec (transformers' own dequantization, bit for bit)."""
    checkpoint = open_checkpoint(base)
    quant = scan(checkpoint.model_config(), checkpoint.tensors)
    stored = _tensors(base)
    dense = {}
    for key, value in stored.items():
        if key in quant.params:
            q = quant.params[key]
            dense[key] = CODEC.dequantize(q, {r: stored[k] for r, k in q.parts.items()})
        elif not quant.is_companion(key):
            dense[key] = value
    out.mkdir()
    save_file(dense, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _adapter(path: Path, seed: int = 1, scale: float = 1.0, targets: list[str] = TARGETS) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
        model.save_pretrained(path)
    return path


def _factors(adapter: Path) -> dict[str, LowRank]:
    """Each base key's term (B, A, s = 8 / 4) in float32, as the merge hands it to a codec."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if "lora_A" in key:
            B = tensors[key.replace("lora_A", "lora_B")]
            out[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = LowRank(((B.float(), A.float(), 8 / 4),))
    return out


def _delta(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (B·A)·s in float32 per base key, as PEFT and the merge kernels compute it."""
    return {key: (B @ A) * s for key, term in _factors(adapter).items() for B, A, s in term.terms}


@pytest.mark.parametrize(("block", "split"), [((16, 16), False), ((32, 32), True)])
def test_keep_requantizes_edited_weights_bit_for_bit(tmp_path: Path, block: tuple[int, int], split: bool) -> None:
    """W' = quantize(dequantize(W) + ΔW) bit for bit, ΔW the adapter's terms by LowRank's rule (the products
    accumulated rank by rank); ragged blocks (32 x 32 on 16- and 48-row weights) and a scale stored before its
    weight included; everything else is byte-identical, the config kept."""
    base = _fp8_base(tmp_path / "base", block, split)
    adapter = _adapter(tmp_path / "adapter")
    result = merge(base, [adapter], out=tmp_path / "out")
    before, after = _tensors(base), _tensors(tmp_path / "out")
    assert after.keys() == before.keys()
    deltas = _factors(adapter)
    assert sorted(result.merged) == sorted(deltas)
    for key, term in deltas.items():
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        parts = {"weight": before[key], "weight_scale_inv": before[scale_key]}
        q = _claim(parts, block)
        want = CODEC.quantize(q, term.apply(CODEC.dequantize(q, parts)), CODEC.all_rows(q), parts)
        assert torch.equal(after[key].view(torch.uint8), want["weight"].view(torch.uint8)), key
        assert torch.equal(after[scale_key], want["weight_scale_inv"]), scale_key
    for key in before.keys() - deltas.keys() - {k.removesuffix("weight") + "weight_scale_inv" for k in deltas}:
        assert torch.equal(after[key].view(torch.uint8), before[key].view(torch.uint8)), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)
    assert set(result.survival) == set(deltas) and 0.5 < result.survival_total <= 1.5  # type: ignore[operator]
    assert result.quantization["codecs"] == {"fp8-block": 14} and result.quantization["written"] == "kept"
    assert result.to_dict()["survival"]["total"] == result.survival_total


def test_keep_loads_in_transformers_and_matches_peft_within_fp8_error(tmp_path: Path) -> None:
    """transformers dequantizes the requantized FP8 model on CPU; its logits match PEFT's merge on the
    dequantized base within FP8's own error: that of transformers' FP8 quantizer applied to PEFT's merge."""
    base = _fp8_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", scale=0.3)
    merge(base, [adapter], out=tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        plain = LlamaForCausalLM.from_pretrained(_dequantized(base, tmp_path / "dense"), dtype=torch.float32)
        peft = PeftModel.from_pretrained(plain, adapter).merge_and_unload().eval()
        unmerged = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    reference = _llama()
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(16, 16))))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            stored = quantizer._quantize_one(name, p) if name.endswith("proj.weight") and ".layers." in name else {}
            value = _dequantize_fp8_weight(stored[name], stored[name + "_scale_inv"], [16, 16], torch.float32) if stored else p
            reference.get_parameter(name).copy_(value)
        got, want, fp8, before = (m(IDS).logits for m in (ours, peft, reference, unmerged))
    error, fp8_error = float((got - want).norm() / want.norm()), float((fp8 - want).norm() / want.norm())
    effect = float((want - before).norm() / want.norm())
    print(f"logits rel. error {error:.4f}; transformers' FP8 quantizer on PEFT's merge {fp8_error:.4f}; adapter effect {effect:.4f}")
    assert error <= 1.05 * fp8_error + 1e-6  # measured 0.0200 and 0.0200 (the same rounding of nearly the same W + ΔW)
    assert error < effect / 5  # measured effect 0.56: the adapter survives
    requantized = _tensors(tmp_path / "out")
    for name, p in ours.named_parameters():  # what transformers loads is the codec's dequantization, bit for bit
        if name.endswith("proj.weight"):
            parts = {"weight": requantized[name], "weight_scale_inv": requantized[name.removesuffix("weight") + "weight_scale_inv"]}
            assert torch.equal(p, CODEC.dequantize(_claim(parts, (16, 16)), parts)), name


def test_dequantized_output_drops_scales_and_config_and_matches_peft(tmp_path: Path) -> None:
    base = _fp8_base(tmp_path / "base", (32, 32), split=True)  # ragged blocks: transformers cannot load this base
    adapter = _adapter(tmp_path / "adapter")
    result = merge(base, [adapter], out=tmp_path / "out", dtype="fp32")
    out = tmp_path / "out"
    tensors = _tensors(out)
    assert not any(k.endswith("weight_scale_inv") for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert result.quantization["written"] == "dequantized" and not result.survival
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        plain = LlamaForCausalLM.from_pretrained(_dequantized(base, tmp_path / "dense"), dtype=torch.float32)
        peft = PeftModel.from_pretrained(plain, adapter).merge_and_unload().eval()
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, peft(IDS).logits, atol=1e-5, rtol=0)
    for key, value in peft.state_dict().items():
        assert torch.allclose(tensors[key], value, atol=1e-6, rtol=0), key


def test_small_delta_is_reported_lost(tmp_path: Path) -> None:
    base = _fp8_base(tmp_path / "base")
    result = merge(base, [_adapter(tmp_path / "adapter", scale=1e-4)], out=tmp_path / "out")
    assert result.survival_total is not None and result.survival_total < 0.5
    assert any("survives requantization" in w for w in result.warnings)
    assert any("keep less than 50%" in w for w in result.warnings)


def test_unmerge_takes_the_adapter_back_out_within_fp8_error(tmp_path: Path) -> None:
    """W'' = Q(Q(W + ΔW) − ΔW): two more e4m3 roundings, each at most half a step (2⁻⁴ relative) per entry."""
    base = _fp8_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", scale=0.3)
    merge(base, [adapter], out=tmp_path / "merged")
    result = unmerge(tmp_path / "merged", adapter, out=tmp_path / "back")
    dense, back = _tensors(_dequantized(base, tmp_path / "dense")), _tensors(_dequantized(tmp_path / "back", tmp_path / "dense2"))
    errors = {key: float((back[key] - dense[key]).norm() / dense[key].norm()) for key in _delta(adapter)}
    assert max(errors.values()) < 0.08, errors  # measured at most 0.05
    assert result.survival_total is not None and result.survival_total > 0.9


def test_stored_quantized_values_are_never_added_to(tmp_path: Path) -> None:
    """A weight beside a scale no codec reads, a bad scale grid, or an FP8 weight with no scale is refused by name."""
    base = _fp8_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter")
    tensors = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    variants = {
        "gptq": {
            **{k: v for k, v in tensors.items() if not k.startswith(key.removesuffix("weight"))},
            key.replace("weight", "qweight"): torch.zeros(4, 32, dtype=torch.int32),
            key.replace("weight", "scales"): torch.ones(1, 32, dtype=torch.float16),
        },
        "grid": {**tensors, key.replace("weight", "weight_scale_inv"): torch.ones(3, 3)},
        "bare": {k: v for k, v in tensors.items() if k != key.replace("weight", "weight_scale_inv")},
    }
    expected = {"gptq": "has qweight", "grid": "in 16x16 blocks needs [2, 2]", "bare": "stored as F8_E4M3"}
    for name, stored in variants.items():
        (base / "model.safetensors").unlink()
        save_file(stored, base / "model.safetensors", metadata={"format": "pt"})
        problems = [p for p in check_base(load(adapter), base) if p.severity == "error"]
        assert [p.code for p in problems] in (["base-quant-unsupported"], ["base-quant-malformed"], ["base-dtype-unsupported"]), name
        assert "q_proj" in problems[0].where and expected[name] in problems[0].message, problems[0].message
        with pytest.raises(InvalidAdapterError, match=re.escape(expected[name])):
            merge(base, [adapter], out=tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    (base / "model.safetensors").unlink()
    save_file(variants["gptq"], base / "model.safetensors", metadata={"format": "pt"})
    elsewhere = _adapter(tmp_path / "elsewhere", targets=["k_proj"])
    with pytest.raises(MergeError, match="cannot dequantize"):  # the qweight would stay quantized without its config
        merge(base, [elsewhere], out=tmp_path / "o", dtype="bf16")
    merge(base, [elsewhere], out=tmp_path / "o")  # kept quantized, the unread tensor passes through
    assert torch.equal(_tensors(tmp_path / "o")[key.replace("weight", "qweight")], variants["gptq"][key.replace("weight", "qweight")])


def test_a_merge_method_on_an_fp8_base_equals_it_on_the_dequantized_base(tmp_path: Path) -> None:
    """TIES selects on each whole ΔWᵢ once, then joins row blocks: the quantized path (dequantize, method,
    write float32) gives the same bits as the float path on the base dequantized beforehand."""
    base = _fp8_base(tmp_path / "base", (16, 16))
    dense = _dequantized(base, tmp_path / "dense")
    adapters = [_adapter(tmp_path / "a", seed=1), _adapter(tmp_path / "b", seed=2)]
    options = {"method": "ties", "density": 0.5}
    merge(base, adapters, out=tmp_path / "q", dtype="fp32", **options)  # type: ignore[arg-type]
    merge(dense, adapters, out=tmp_path / "f", dtype="fp32", **options)  # type: ignore[arg-type]
    got, want = _tensors(tmp_path / "q"), _tensors(tmp_path / "f")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_companions_are_read_a_shard_at_a_time_and_handed_out_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first scale asked for brings the rest of its shard's small scales with it (one read of the shard); each
    is handed out once and dropped; a batch stops at COMPANION_BATCH bytes."""
    base = _fp8_base(tmp_path / "base", (16, 16), split=True)
    checkpoint = open_checkpoint(base)
    quant = scan(checkpoint.model_config(), checkpoint.tensors)
    keys = sorted(k for q in quant.params.values() for k in q.companions.values())
    companions = Companions(checkpoint, set(keys))
    first = companions.take([keys[0]])
    assert torch.equal(first[keys[0]], read_stored(checkpoint, [keys[0]])[keys[0]])
    assert not companions.pending and set(companions.held) == set(keys[1:])
    rest = companions.take(keys[1:])
    assert set(rest) == set(keys[1:]) and not companions.held
    monkeypatch.setattr(quantized, "COMPANION_BATCH", checkpoint.tensors[keys[0]].nbytes)
    capped = Companions(checkpoint, set(keys))
    capped.take([keys[0]])
    assert capped.pending == set(keys[1:]) and not capped.held
