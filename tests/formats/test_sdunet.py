"""The SD1/SD2/SDXL UNet table (original single-file layout vs diffusers) against diffusers' own converters and loaders.

The table is checked against ``convert_ldm_unet_checkpoint`` on tiny UNets built from configs (an
SD1-shaped one and an SDXL-shaped one, two ResNets per level as in the real models); kohya LoRAs in
diffusers naming merge into an original single file as into a diffusers UNet, and SGM-named SDXL
LoRAs (both text encoders too) read as ``load_lora_weights`` applies them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools
from loratools.formats.sdunet import to_diffusers, to_original

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from .diffusion_helpers import applied_deltas, load_into, max_diff, our_deltas  # noqa: E402

COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16), cross_attention_dim=8,
              attention_head_dim=2, norm_num_groups=4)  # fmt: skip
SD1 = dict(COMMON, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(
    COMMON, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True,
)  # fmt: skip


def _unet(config) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def _original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict as an original single file, through :func:`to_original` alone."""
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        paths = to_original(module)
        assert paths, key
        if len(paths) == 2:  # an upsampler: .2.conv after an attention, else .1.conv
            i = module.split(".")[1]
            paths = [paths[1] if any(k.startswith(f"up_blocks.{i}.attentions.") for k in state) else paths[0]]
        assert to_diffusers(paths[0]) == module
        out[f"model.diffusion_model.{paths[0]}.{param}"] = tensor
    return out


@pytest.mark.parametrize("config", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_table_is_diffusers_single_file_converter(config):
    unet = _unet(config)
    state = unet.state_dict()
    theirs = convert_ldm_unet_checkpoint(_original(state), dict(unet.config))
    assert sorted(theirs) == sorted(state)
    assert all(torch.equal(theirs[k], v) for k, v in state.items())


def _factors(model, names, g, rank=2):
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        A = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        out[name] = (A, torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.3)
    return out


def _kohya(path, factors, names):
    tensors = {}
    for module, (A, B) in factors.items():
        name = names(module)
        tensors |= {f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B, f"{name}.alpha": torch.tensor(1.0)}
    save_file(tensors, path)
    return path


SD1_MODULES = [
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.1.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.1.time_emb_proj",
    "up_blocks.0.resnets.2.conv2",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "time_embedding.linear_1",
    "conv_in",
    "conv_out",
]


def test_kohya_sd1_merges_into_an_original_single_file_as_into_diffusers(tmp_path):
    unet = _unet(SD1)
    state = unet.state_dict()
    save_file(state, tmp_path / "unet.safetensors")
    save_file(_original(state), tmp_path / "sd1.safetensors")
    factors = _factors(unet, SD1_MODULES, torch.Generator().manual_seed(1))
    lora = _kohya(tmp_path / "k.safetensors", factors, lambda m: "lora_unet_" + m.replace(".", "_"))
    mapped = loratools.load(lora, base=tmp_path / "sd1.safetensors")
    assert len(mapped.modules) == len(SD1_MODULES) and all(n.startswith("model.diffusion_model.") for n in mapped.modules)
    loratools.merge(tmp_path / "unet.safetensors", [lora], out=tmp_path / "d.safetensors")
    loratools.merge(tmp_path / "sd1.safetensors", [lora], out=tmp_path / "o.safetensors")
    merged = load_file(tmp_path / "d.safetensors")
    back = convert_ldm_unet_checkpoint(load_file(tmp_path / "o.safetensors"), dict(unet.config))
    assert all(torch.equal(back[k], v) for k, v in merged.items())  # the same merge, bitwise
    assert sum(not torch.equal(merged[k], v) for k, v in state.items()) == len(SD1_MODULES)


def _text_encoders():
    torch.manual_seed(2)
    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                            max_position_embeddings=16, projection_dim=8)  # fmt: skip
    return CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()


def test_sdxl_sgm_names_read_as_diffusers_applies_them(tmp_path):
    unet, (te1, te2) = _unet(SDXL), _text_encoders()
    base = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    base |= {f"text_encoder.{k}": v for k, v in te1.state_dict().items()} | {f"text_encoder_2.{k}": v for k, v in te2.state_dict().items()}
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "sdxl.safetensors")
    g = torch.Generator().manual_seed(3)
    unet_modules = [
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        "down_blocks.1.attentions.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
        "down_blocks.0.resnets.1.conv1",
        "up_blocks.1.resnets.0.time_emb_proj",
    ]
    # transformers 5's CLIPTextModel has no text_model level (CLIPTextModelWithProjection keeps it); kohya names have it
    te_modules = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"]
    sgm = {m: "lora_unet_" + to_original(m)[0].replace(".", "_") for m in unet_modules}
    factors = {("unet", m): f for m, f in _factors(unet, unet_modules, g).items()}
    factors |= {("text_encoder", m): f for m, f in _factors(te1, te_modules, g).items()}
    factors |= {("text_encoder_2", m): f for m, f in _factors(te2, ["text_model." + m for m in te_modules], g).items()}
    kohya_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    lora = _kohya(
        tmp_path / "xl.safetensors",
        factors,
        lambda cm: (
            sgm[cm[1]] if cm[0] == "unet" else kohya_prefix[cm[0]] + "text_model_" + cm[1].removeprefix("text_model.").replace(".", "_")
        ),
    )
    ours = our_deltas(lora, base=tmp_path / "sdxl.safetensors")
    assert len(ours) == 10

    def applied(path):
        te1, te2 = _text_encoders()
        return applied_deltas(load_into(StableDiffusionXLLoraLoaderMixin, path, unet=_unet(SDXL), text_encoder=te1, text_encoder_2=te2))

    # diffusers 0.42 reads kohya text-encoder attention LoRAs (self_attn_q_proj) as to_q_lora and then injects
    # nothing for them, silently; every other key it consumes, with our ΔW
    direct = applied(lora)
    dropped = {"text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"}
    assert sorted(direct) == sorted(set(ours) - dropped)
    assert max_diff(direct, ours) < 1e-6
    # our diffusers output of the same file: diffusers applies all 10 modules, each with our ΔW
    loratools.convert(lora, tmp_path / "d.safetensors", to="diffusers", base=tmp_path / "sdxl.safetensors")
    converted = applied(tmp_path / "d.safetensors")
    assert sorted(converted) == sorted(ours) and max_diff(converted, ours) < 1e-6
