"""SD3 / SD3.5 MMDiT LoRA layouts (kohya ``lora_unet_joint_blocks_*``, original ``joint_blocks.*``) against diffusers.

The table is checked against diffusers' own single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``) on a tiny SD3Transformer2DModel built from a
config (two blocks, the last ``pre_only``, block 0 with SD3.5's second attention); LoRAs against
``load_lora_weights`` (diffusers reads no kohya SD3 names itself, so it loads our diffusers output).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools
from loratools.formats.sd3 import MMDIT

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders import SD3LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

from .diffusion_helpers import applied_deltas, load_into, max_diff, original_checkpoint, our_deltas  # noqa: E402

CONFIG = dict(
    sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
    caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
)  # fmt: skip


def _model() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**CONFIG).eval()


def _original(state_dict):
    return original_checkpoint(state_dict, MMDIT, 2, {"pos_embed.pos_embed": "pos_embed"})


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny model as a diffusers-layout base, and as an original single file (``model.diffusion_model.`` keys)."""
    root = tmp_path_factory.mktemp("sd3")
    state = _model().state_dict()
    save_file(state, root / "diffusers.safetensors")
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in _original(state).items()}, root / "original.safetensors")
    return root / "diffusers.safetensors", root / "original.safetensors"


def test_table_is_diffusers_single_file_converter():
    state = _model().state_dict()
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(_original(state))
    assert sorted(theirs) == sorted(state)
    assert all(torch.equal(theirs[k], v) for k, v in state.items())  # every tensor, bitwise


def _kohya_lora(path, *, rank=2, alpha=3.0):
    model, g, tensors = _model(), torch.Generator().manual_seed(1), {}
    for row in MMDIT.rows:
        for i in range(2) if "{i}" in row.source else [None]:
            sub = (lambda t: t.replace("{i}", str(i))) if i is not None else (lambda t: t)  # noqa: B023
            try:
                layers = [model.get_submodule(sub(t)) for t in row.targets]
            except AttributeError:
                continue
            w = layers[0].weight
            rows = sum(layer.weight.shape[0] for layer in layers)
            name = "lora_unet_" + sub(row.source).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(rows, rank, *([1] * (w.dim() - 2)), generator=g) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def test_kohya_sd3_merges_the_same_into_either_base_layout(bases, tmp_path):
    diffusers_base, original_base = bases
    lora = _kohya_lora(tmp_path / "k.safetensors")
    # block 0: 7 + 7 + attn2's 4; block 1: 7 + 4 (its context stream is pre_only); 8 embedder and final-layer modules
    assert len(loratools.load(lora).modules) == 18 + 11 + 8
    assert len(loratools.load(lora, base=original_base).modules) == 12 + 7 + 8  # the original (fused) modules
    loratools.merge(diffusers_base, [lora], out=tmp_path / "d.safetensors")
    loratools.merge(original_base, [lora], out=tmp_path / "o.safetensors")
    merged = load_file(tmp_path / "d.safetensors")
    via_original = convert_sd3_transformer_checkpoint_to_diffusers(load_file(tmp_path / "o.safetensors"))
    assert sorted(via_original) == sorted(merged)
    diff = max(float((via_original[k] - v).abs().max()) for k, v in merged.items())
    assert diff < 1e-6, diff


def test_diffusers_applies_our_reading_of_a_kohya_sd3_file(tmp_path):
    lora = _kohya_lora(tmp_path / "k.safetensors")
    loratools.convert(lora, tmp_path / "d.safetensors", to="diffusers")
    applied = applied_deltas(
        load_into(SD3LoraLoaderMixin, tmp_path / "d.safetensors", transformer=_model(), text_encoder=None, text_encoder_2=None)
    )
    ours = our_deltas(lora)
    assert sorted(applied) == sorted(ours)  # every module consumed
    assert max_diff(applied, ours) < 1e-6
    loratools.convert(tmp_path / "d.safetensors", tmp_path / "back.safetensors", to="kohya")
    src, back = load_file(lora), load_file(tmp_path / "back.safetensors")
    assert sorted(src) == sorted(back)  # fused again: the same kohya names, none left over
    again = our_deltas(tmp_path / "back.safetensors")
    assert max_diff(again, ours) < 1e-6
