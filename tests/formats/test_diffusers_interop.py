"""What loratools writes for diffusers users, applied by diffusers itself (``load_lora_weights``) on a tiny UNet.

The truth is diffusers applying the original file unmerged; every output (kohya, diffusers, scaled,
resized, PEFT) must mean the same ΔW there, and loratools' merge of a file must give the UNet
diffusers gives with that file loaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import main

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: E402

CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
MODULES = {  # module -> rank: mixed ranks, and an alpha_pattern entry, so scales differ per module
    f"{ATTN}.attn1.to_q": 2,
    f"{ATTN}.attn1.to_v": 3,
    f"{ATTN}.attn2.to_k": 2,
    f"{ATTN}.ff.net.2": 4,
}


class _Pipe(StableDiffusionLoraLoaderMixin):
    """The smallest object StableDiffusionLoraLoaderMixin.load_lora_weights accepts: a UNet and no text encoder."""

    unet_name, text_encoder_name, hf_device_map = "unet", "text_encoder", None

    def __init__(self, unet: UNet2DConditionModel):
        self.unet, self.text_encoder = unet, None

    @property
    def components(self) -> dict[str, UNet2DConditionModel]:
        return {"unet": self.unet}


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3]), torch.randn(1, 3, 8, generator=g)


@torch.no_grad()
def _output(unet: UNet2DConditionModel) -> torch.Tensor:
    return unet(*_inputs()).sample


def _diffusers_applies(lora: Path) -> tuple[torch.Tensor, int]:
    """diffusers' own output with ``lora`` loaded (unmerged), and how many LoRA layers it injected."""
    pipe = _Pipe(_unet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(lora))
    layers = sum(1 for m in pipe.unet.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    return _output(pipe.unet), layers


def _merged_output(base: Path, lora: Path, tmp: Path) -> torch.Tensor:
    out = tmp / f"merged-{lora.stem}.safetensors"
    loratools.merge(base, [lora], out=out)
    unet = _unet()
    unet.load_state_dict(load_file(out))
    return _output(unet)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """The UNet as a safetensors base, and a diffusers-layout LoRA for it (alphas in lora_adapter_metadata)."""
    root = tmp_path_factory.mktemp("diffusers-interop")
    base = root / "unet.safetensors"
    save_file(_unet().state_dict(), base)
    unet, g = _unet(), torch.Generator().manual_seed(1)
    tensors = {}
    for name, rank in MODULES.items():
        layer = unet.get_submodule(name)
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    config = {"unet.r": 2, "unet.lora_alpha": 4, "unet.rank_pattern": {"to_v": 3, "net.2": 4}, "unet.alpha_pattern": {"net.2": 2}}
    config["unet.target_modules"] = sorted(MODULES)
    lora = root / "pytorch_lora_weights.safetensors"
    save_file(tensors, lora, metadata={"lora_adapter_metadata": json.dumps(config), "format": "pt"})
    return base, lora


def _run(*args: object) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_loratools_reads_a_diffusers_file_as_diffusers_applies_it(setup, tmp_path):
    base, lora = setup
    truth, layers = _diffusers_applies(lora)
    assert layers == len(MODULES)
    assert torch.allclose(_merged_output(base, lora, tmp_path), truth, atol=1e-5, rtol=0)


@pytest.mark.parametrize("to,name", [("kohya", "k.safetensors"), ("diffusers", "d.safetensors")])
def test_converted_files_mean_the_same_in_diffusers(setup, tmp_path, to, name):
    base, lora = setup
    truth, _ = _diffusers_applies(lora)
    _run("convert", lora, "--to", to, "-o", tmp_path / name)
    with safe_open(str(tmp_path / name), "pt") as fh:
        assert "lora_adapter_metadata" not in fh.metadata()  # stale scaling metadata is dropped
    got, layers = _diffusers_applies(tmp_path / name)
    assert layers == len(MODULES) and torch.allclose(got, truth, atol=1e-5, rtol=0)
    assert torch.allclose(_merged_output(base, tmp_path / name, tmp_path), truth, atol=1e-5, rtol=0)


def test_scale_and_resize_keep_the_diffusers_layout_and_their_meaning(setup, tmp_path):
    base, lora = setup
    _run("scale", lora, "0.5", "-o", tmp_path / "half.safetensors")
    _run("resize", lora, "--energy", "0.9", "-o", tmp_path / "small.safetensors")
    for out in ("half.safetensors", "small.safetensors"):
        with safe_open(str(tmp_path / out), "pt") as fh:
            assert all(k.startswith("unet.") for k in fh.keys()) and "lora_adapter_metadata" not in fh.metadata()
        applied, layers = _diffusers_applies(tmp_path / out)
        assert layers == len(MODULES)
        assert torch.allclose(applied, _merged_output(base, tmp_path / out, tmp_path), atol=1e-5, rtol=0)
    ranks = {m.rank for m in loratools.load(tmp_path / "small.safetensors").modules.values()}
    assert len(ranks) > 1  # mixed ranks: the case diffusers used to mis-scale
    loratools.merge(base, [lora], out=tmp_path / "f.safetensors")
    loratools.merge(base, [tmp_path / "half.safetensors"], out=tmp_path / "h.safetensors")
    W, full, half = load_file(base), load_file(tmp_path / "f.safetensors"), load_file(tmp_path / "h.safetensors")
    key = f"{ATTN}.attn1.to_q.weight"
    assert torch.allclose(half[key] - W[key], 0.5 * (full[key] - W[key]), atol=1e-6, rtol=0)


def test_peft_output_is_relative_to_the_unet(setup, tmp_path):
    _, lora = setup
    truth, _ = _diffusers_applies(lora)
    _run("convert", lora, "--to", "peft", "-o", tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert all(not t.startswith("unet.") for t in config["target_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_unet(), tmp_path / "p")
    assert torch.allclose(_output(model.base_model.model), truth, atol=1e-5, rtol=0)


def test_several_components_become_one_peft_adapter_each(setup, tmp_path):
    _, lora = setup
    tensors = load_file(lora)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 4)
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(4, 2)
    save_file(tensors, tmp_path / "both.safetensors")
    _run("convert", tmp_path / "both.safetensors", "--to", "peft", "-o", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_encoder", "unet"]
    assert list(loratools.load(tmp_path / "out" / "text_encoder").modules) == ["text_model.encoder.layers.0.self_attn.q_proj"]
    single = CliRunner().invoke(
        main, ["convert", str(tmp_path / "both.safetensors"), "--to", "peft", "-o", str(tmp_path / "x.safetensors")]
    )
    assert single.exit_code == 2 and "one PEFT adapter per component" in single.stderr
