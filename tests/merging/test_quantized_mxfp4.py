"""Merging into a gpt-oss base whose experts are MXFP4 (``*_blocks`` / ``*_scales``).

The base is a tiny ``GptOssConfig`` model saved by transformers with its experts quantized by
:func:`loratools.io.quant.mxfp4.quantize_experts`; transformers loads it dequantized on the CPU
(``Mxfp4Config(dequantize=True)``), and that float model with PEFT's own ``merge_and_unload`` is
the reference.  ``--dtype keep`` must store exactly ``quantize(dequantize(W) + ΔW)``; its logits then
differ from the float reference only by MXFP4's own rounding of the merged experts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loratools.cli.app import main
from loratools.io.quant import mxfp4

IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 12, 40]])
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def gpt_oss_config() -> transformers.GptOssConfig:
    return transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=64,  # MXFP4 blocks run over inputs: 64 = two blocks of 32
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )


@pytest.fixture(scope="module")
def mx_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gpt-oss checkpoint with MXFP4 experts and ``quantization_config`` as gpt-oss ships it."""
    root = tmp_path_factory.mktemp("gptoss")
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(gpt_oss_config()).eval().save_pretrained(root / "float")
    stored = {}
    for key, value in load_file(root / "float" / "model.safetensors").items():
        if key.endswith(EXPERTS):
            stored[f"{key}_blocks"], stored[f"{key}_scales"] = mxfp4.quantize_experts(value.float())
        else:
            stored[key] = value
    base = root / "mx"
    base.mkdir()
    save_file(stored, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "float" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture(scope="module")
def experts_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gptoss-lora")
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=list(EXPERTS), init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(transformers.GptOssForCausalLM(gpt_oss_config()), config).save_pretrained(path)
    return path


def _load(path: Path, quantized: bool) -> transformers.PreTrainedModel:
    kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if quantized else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.fixture(scope="module")
def reference(mx_base: Path, experts_adapter: Path) -> transformers.PreTrainedModel:
    """PEFT's merge on the dequantized base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_load(mx_base, quantized=True), experts_adapter).merge_and_unload().eval()


def _merge(base: Path, adapter: Path, out: Path, dtype: str) -> dict:
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out), "--dtype", dtype, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_keep_stores_quantize_of_dequantized_plus_delta(mx_base: Path, experts_adapter: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "keep"
    result = _merge(mx_base, experts_adapter, out, "keep")
    experts = {f"model.layers.{i}.{n}" for i in range(2) for n in EXPERTS}
    assert experts <= set(result["survival"]["tensors"]) and result["survival"]["total"] > 0
    written, before = load_file(out / "model.safetensors"), load_file(mx_base / "model.safetensors")
    assert set(written) == set(before) and all(written[k].dtype == before[k].dtype for k in written)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    merged = dict(reference.named_parameters())
    for layer in range(2):
        for name in EXPERTS:
            key = f"model.layers.{layer}.{name}"
            want_blocks, want_scales = mxfp4.quantize_experts(merged[key].detach())
            assert torch.equal(written[f"{key}_scales"], want_scales), key
            assert torch.equal(written[f"{key}_blocks"], want_blocks), key
            assert not torch.equal(written[f"{key}_blocks"], before[f"{key}_blocks"])  # ΔW survived
    # the attention LoRA on the float q_proj beside them merges as usual
    assert torch.allclose(written["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
    # transformers reads the output back (dequantized): logits of Q(W + ΔW), within MXFP4's rounding of the reference
    loaded = _logits(_load(out, quantized=True))
    want = _logits(reference)
    requantized = _load(mx_base, quantized=True)
    with torch.no_grad():
        for key, p in requantized.named_parameters():
            p.copy_(mxfp4.dequantize_experts(*mxfp4.quantize_experts(merged[key])) if key.endswith(EXPERTS) else merged[key])
    assert torch.allclose(loaded, _logits(requantized), atol=1e-5)
    # so the only difference from the float reference is MXFP4's rounding of the merged experts, and
    # the output is nearer the reference than the unmerged base is (the adapter is in it)
    assert (loaded - want).norm() < (_logits(_load(mx_base, quantized=True)) - want).norm()


def test_bf16_writes_the_dequantized_merge(mx_base: Path, experts_adapter: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    _merge(mx_base, experts_adapter, out, "bf16")
    written = load_file(out / "model.safetensors")
    assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = dict(reference.named_parameters())
    for key in (f"model.layers.{i}.{n}" for i in range(2) for n in EXPERTS):
        assert written[key].dtype == torch.bfloat16 and written[key].shape == merged[key].shape
        assert torch.allclose(written[key].float(), merged[key].detach(), rtol=2**-8, atol=1e-6), key
    loaded = _logits(_load(out, quantized=False))
    want = _logits(reference)
    assert (loaded - want).norm() / want.norm() < 0.02  # bf16 rounding of every weight


def test_unmerge_takes_the_experts_back_out_within_mxfp4_error(mx_base: Path, experts_adapter: Path, tmp_path: Path) -> None:
    """W'' = Q(Q(W + ΔW) − ΔW): nearer W than the merge is, off only by two MXFP4 roundings."""
    _merge(mx_base, experts_adapter, tmp_path / "merged", "keep")
    result = CliRunner().invoke(main, ["unmerge", str(tmp_path / "merged"), str(experts_adapter), "-o", str(tmp_path / "back"), "--quiet"])
    assert result.exit_code == 0, result.output
    base, merged, back = (load_file(p / "model.safetensors") for p in (mx_base, tmp_path / "merged", tmp_path / "back"))
    for key in (f"model.layers.{i}.{n}" for i in range(2) for n in EXPERTS):
        w, w1, w2 = (mxfp4.dequantize_experts(t[f"{key}_blocks"], t[f"{key}_scales"]) for t in (base, merged, back))
        assert (w2 - w).norm() < 0.5 * (w1 - w).norm(), key
        assert (w2 - w).norm() / w.norm() < 0.5, key  # 4-bit: each rounding costs up to a quarter of a block's scale


def test_validate_base_passes_and_a_nan_scale_is_refused_by_name(mx_base: Path, experts_adapter: Path, tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["validate", str(experts_adapter), "--base", str(mx_base)]).exit_code == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    stored = load_file(mx_base / "model.safetensors")
    stored["model.layers.1.mlp.experts.down_proj_scales"][0, 0, 0] = 255
    save_file(stored, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((mx_base / "config.json").read_text())
    result = CliRunner().invoke(main, ["merge", str(broken), str(experts_adapter), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 3 and "model.layers.1.mlp.experts.down_proj_scales" in result.output and "255" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
