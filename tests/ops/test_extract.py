"""extract: randomized low-rank factors of tuned - base, rank choice, modules_to_save, PEFT round trip, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loratools
from loratools.cli import main
from loratools.errors import ArgumentError, ShapeError
from loratools.ops.extract import choose_rank, low_rank


def _optimal_error(M: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the best rank-r approximation error is the norm of the discarded singular values."""
    return float(torch.linalg.svdvals(M.double())[rank:].norm())


def _pair(tmp_path, seed=0, noise=1e-2):
    """base and tuned = base + L (rank 3) + noise on a 96 x 80 linear, a changed bias, norm and embedding, a rank-2 conv."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "net.proj.weight": torch.randn(96, 80, generator=g),
        "net.proj.bias": torch.randn(96, generator=g),
        "net.conv.weight": torch.randn(16, 8, 3, 3, generator=g),
        "net.norm.weight": torch.ones(80),
        "net.embed_tokens.weight": torch.randn(30, 80, generator=g),
        "net.same.weight": torch.randn(4, 4, generator=g),
    }
    L = torch.randn(96, 3, generator=g) @ torch.randn(3, 80, generator=g)
    N = noise * torch.randn(96, 80, generator=g)
    conv = (torch.randn(16, 2, generator=g) @ torch.randn(2, 72, generator=g)).reshape(16, 8, 3, 3)
    tuned = dict(base)
    tuned["net.proj.weight"] = base["net.proj.weight"] + L + N
    tuned["net.proj.bias"] = base["net.proj.bias"] + 0.25
    tuned["net.conv.weight"] = base["net.conv.weight"] + conv
    tuned["net.norm.weight"] = base["net.norm.weight"] * 1.5
    tuned["net.embed_tokens.weight"] = base["net.embed_tokens.weight"] + 1.0
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return L, N, conv


def test_low_rank_is_within_five_percent_of_eckart_young():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(300, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    M = (U * (0.9 ** torch.arange(200.0))) @ V.T  # slowly decaying spectrum: the hard case for sketching
    Uk, S, Vh = low_rank(M, 16)
    err = float((M - (Uk * S) @ Vh).double().norm())
    assert err <= 1.05 * _optimal_error(M, 16)
    assert torch.allclose(S, torch.linalg.svdvals(M)[:16], rtol=1e-3)


def test_choose_rank_by_energy():
    S = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert choose_rank(S, 14.0, 8, None) == 3
    assert choose_rank(S, 14.0, 8, 0.9) == 2  # 13/14 = 0.93 is the first >= 0.9
    assert choose_rank(S, 14.0, 8, 0.5) == 1
    assert choose_rank(S, 14.0, 2, 1.0) == 2  # never above --rank


def test_recovers_the_low_rank_part(tmp_path):
    """‖X - L‖ <= ‖X - Δ‖ + ‖N‖ <= 1.05·‖Δ - Δ₃‖ + ‖N‖ <= 2.05·‖N‖ (Δ₃ optimal, and L has rank 3)."""
    L, N, conv = _pair(tmp_path)
    adapter, report = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3)
    X = adapter.modules["net.proj"].delta()
    assert float((X - L).norm()) <= 2.05 * float(N.norm())
    assert float((X - L).norm()) <= 1e-2 * float(L.norm())
    assert float((L + N - X).norm()) <= 1.05 * _optimal_error(L + N, 3)
    assert torch.allclose(adapter.modules["net.conv"].delta(), conv, atol=1e-4)  # exact rank 2 within rank 3
    rows = {r.module: r for r in report.modules}
    assert rows["net.proj"].kept_energy >= 1 - 1.05 * float(N.norm() ** 2 / (L + N).norm() ** 2)
    assert rows["net.conv"].kept_energy == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(adapter.modules["net.proj"].bias, torch.full((96,), 0.25))  # Δb over scale 1
    assert torch.equal(adapter.modules["net.conv"].bias, torch.zeros(16))
    assert sorted(report.saved) == ["net.embed_tokens", "net.norm"]
    assert adapter.config["modules_to_save"] == report.saved
    assert torch.equal(adapter.extra_tensors["base_model.model.net.norm.weight"], torch.full((80,), 1.5))
    assert "net.same" not in adapter.modules  # unchanged tensors produce nothing


def test_energy_lowers_rank_and_flag_skips_saved_modules(tmp_path):
    _pair(tmp_path, noise=0.0)
    adapter, report = loratools.extract(
        tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=8, energy=0.999999, skip_modules_to_save=True
    )
    assert {m.module: m.rank for m in report.modules} == {"net.proj": 3, "net.conv": 2}
    assert adapter.extra_tensors == {} and report.saved == []
    assert set(report.skipped) == {"net.norm.weight", "net.embed_tokens.weight"}


def test_errors(tmp_path):
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "same.safetensors"))
    with pytest.raises(ShapeError, match="nothing to extract"):
        loratools.extract(tmp_path / "same.safetensors", tmp_path / "same.safetensors", rank=2)
    with pytest.raises(ArgumentError, match="energy"):
        loratools.extract(tmp_path / "same.safetensors", tmp_path / "same.safetensors", rank=2, energy=1.5)


def test_extracted_adapter_reproduces_the_tuned_model_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from ..conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=50, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
            w = tuned.get_submodule(name).weight
            w += 0.1 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        tuned.model.norm.weight *= 1.2
    for model, name in ((base, "base"), (tuned, "tuned")):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=2, out=tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)


def test_cli_extract_json(tmp_path):
    _pair(tmp_path)
    args = [
        "extract",
        str(tmp_path / "base.safetensors"),
        str(tmp_path / "tuned.safetensors"),
        "--rank",
        "3",
        "-o",
        str(tmp_path / "x"),
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert sorted(m["module"] for m in data["modules"]) == ["net.conv", "net.proj"]
    assert loratools.validate(tmp_path / "x").ok
    assert CliRunner().invoke(main, args).exit_code == 3  # output exists


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    _pair(tmp_path)
    cpu, _ = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3, device="cpu")
    gpu, report = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3, device="cuda")
    assert report.device.startswith("cuda")
    for name, module in cpu.modules.items():
        assert torch.allclose(module.delta(), gpu.modules[name].delta(), atol=1e-3)


def test_extract_to_kohya_maps_back_onto_the_base(tmp_path):
    """An SD-style pair: extracting straight to a kohya file, then reading it with the base, gives the same ΔW."""
    g = torch.Generator().manual_seed(7)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    base = {key: torch.randn(8, 4, 3, 3, generator=g), "model.diffusion_model.out.0.weight": torch.ones(8)}
    tuned = {
        key: base[key] + (torch.randn(8, 2, generator=g) @ torch.randn(2, 36, generator=g)).reshape(8, 4, 3, 3),
        "model.diffusion_model.out.0.weight": torch.ones(8) * 2,
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "lora.safetensors"
    kwargs = {"rank": 4, "out": out, "to": "kohya"}
    with pytest.raises(loratools.FormatError, match="modules_to_save"):
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", **kwargs)
    loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", skip_modules_to_save=True, **kwargs)
    adapter = loratools.load(out, base=tmp_path / "base.safetensors")
    assert list(adapter.modules) == ["model.diffusion_model.input_blocks.0.0"]
    assert torch.allclose(base[key] + adapter.modules["model.diffusion_model.input_blocks.0.0"].delta(), tuned[key], atol=1e-4)


def test_fp8_checkpoints_are_read_dequantized(tmp_path):
    """Extracting from an FP8 base and its FP8 merge recovers ΔW through the scales: never the raw e4m3 bytes,
    never the scales as modules; the error is the requantization's (measured at most 2.2% of ‖ΔW‖)."""
    from ..merging.test_quantized import _adapter, _delta, _fp8_base

    base = _fp8_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", scale=0.3)
    loratools.merge(base, [adapter], out=tmp_path / "merged")
    extracted, report = loratools.extract(base, tmp_path / "merged", rank=4)
    assert not report.saved and not any("scale" in k for k in report.skipped)
    deltas = _delta(adapter)
    assert sorted(f"{m}.weight" for m in extracted.modules) == sorted(deltas)
    for key, delta in deltas.items():
        m = extracted.modules[key.removesuffix(".weight")]
        got = (m.B.float() @ m.A.float()) * m.scale
        assert float((got - delta).norm() / delta.norm()) < 0.05, key
