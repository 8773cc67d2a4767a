"""Flux.1 LoRA layouts (BFL original, kohya, XLabs) read as diffusers' FluxTransformer2DModel applies them.

The truth is diffusers itself: its converters (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_xlabs_flux_lora_to_diffusers``, ``_convert_bfl_flux_control_lora_to_diffusers``) and
``load_lora_weights`` on a tiny FluxTransformer2DModel built from a config.  Every key must be
consumed, each ΔW diffusers applies must equal ours, and fused q/k/v splits must be exact.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import main
from loratools.errors import FormatError
from loratools.formats.flux import BFL, XLABS

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import FluxLoraLoaderMixin  # noqa: E402
from diffusers.loaders import lora_conversion_utils as conv  # noqa: E402

from .diffusion_helpers import applied_deltas, load_into, max_diff, original_checkpoint, our_deltas  # noqa: E402

CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)  # fmt: skip


def _model() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIG).eval()


def _fused_shapes(table, model) -> dict[str, tuple[int, int]]:
    """(rows, in) of every original module of ``table`` the tiny model has: its parts' rows added up."""
    shapes = {}
    for row in table.rows:
        src = row.source.replace("{i}", "0")
        try:
            layers = [model.get_submodule(t.replace("{i}", "0")) for t in row.targets]
        except AttributeError:
            continue
        shapes[src] = (sum(layer.out_features for layer in layers), layers[0].in_features)
    return shapes


def _factors(shapes, seed=1, rank=3):
    g = torch.Generator().manual_seed(seed)
    return {
        src: (torch.randn(rank, inp, generator=g) * 0.2, torch.randn(rows, rank, generator=g) * 0.2) for src, (rows, inp) in shapes.items()
    }


def _kohya_file(path, factors, *, alpha=1.5):
    tensors = {}
    for src, (A, B) in factors.items():
        name = "lora_unet_" + src.replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B, f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(
        hidden_states=torch.randn(1, 4, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 8, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.0]),
        img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
    )  # fmt: skip


@torch.no_grad()
def _out(model):
    return model(**_inputs()).sample


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "transformer.safetensors"
    save_file(_model().state_dict(), path)
    return path


def test_kohya_flux_reads_as_diffusers_applies_it(base, tmp_path):
    factors = _factors(_fused_shapes(BFL, _model()))
    # diffusers' kohya converter splits single_blocks.linear1 at Flux.1-dev's sizes (3072 x 3 + 12288), so the
    # tiny model's linear1 is checked at full size below instead; the embedders and final layer, below too
    blocks = {k: v for k, v in factors.items() if k.startswith(("double_blocks.", "single_blocks.")) and not k.endswith("linear1")}
    lora = _kohya_file(tmp_path / "k.safetensors", blocks)
    applied = applied_deltas(load_into(FluxLoraLoaderMixin, lora, transformer=_model(), text_encoder=None))
    ours = our_deltas(lora)
    assert sorted(applied) == sorted(ours) and len(ours) == 16  # every key consumed, on both sides
    assert max_diff(applied, ours) < 1e-6
    loratools.merge(base, [lora], out=tmp_path / "m.safetensors")
    merged = _model()
    merged.load_state_dict(load_file(tmp_path / "m.safetensors"))
    reference = load_into(FluxLoraLoaderMixin, lora, transformer=_model(), text_encoder=None)["transformer"]
    assert torch.allclose(_out(merged), _out(reference), atol=1e-5, rtol=0)


def test_kohya_flux_embedders_and_final_layer_match_diffusers_converter(tmp_path):
    factors = _factors(_fused_shapes(BFL, _model()))
    glob = {k: v for k, v in factors.items() if not k.startswith(("double_blocks.", "single_blocks."))}
    lora = _kohya_file(tmp_path / "g.safetensors", glob, alpha=1.5)
    ours = loratools.load(lora).modules
    theirs = conv._convert_kohya_flux_lora_to_diffusers(load_file(lora))
    # diffusers 0.42 names these without the "transformer." prefix, so load_lora_weights drops all 10 of them
    # silently; and it ignores the final layer's alphas ("TODO: alphas"), which sd-scripts applies
    assert not any(k.startswith("transformer.") for k in theirs)
    assert sorted(ours) == sorted("transformer." + k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight"))
    assert len(ours) == 10
    for name, m in ours.items():
        key = name.removeprefix("transformer.")
        delta = theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"]
        scale = m.scale if key not in ("proj_out", "norm_out.linear") else 1.0
        assert torch.allclose(delta * (m.scale / scale), m.delta(), atol=1e-6, rtol=1e-6), name


def test_linear1_splits_exactly_at_flux_dev_size(tmp_path):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 3072, generator=g), torch.randn(3 * 3072 + 12288, 4, generator=g)
    lora = _kohya_file(tmp_path / "l1.safetensors", {"single_blocks.0.linear1": (A, B)}, alpha=2.0)
    ours = loratools.load(lora).modules
    names = [f"transformer.single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert sorted(ours) == sorted(names) and all(ours[n].rank == 4 for n in names)
    # factors, not dense ΔWs (21504 x 3072 each): every part keeps A and alpha and holds its rows of B, bitwise,
    # so s·Bᵢ·A is exactly those rows of s·B·A (the dense check at small sizes is test_fusion's)
    rows = torch.split(B, [3072, 3072, 3072, 12288])
    assert all(ours[n].A is ours[names[0]].A and torch.equal(ours[n].A, A) and ours[n].alpha == 2.0 for n in names)
    assert all(torch.equal(ours[n].B, r) for n, r in zip(names, rows, strict=True))
    theirs = conv._convert_kohya_flux_lora_to_diffusers(load_file(lora))
    for n in names:  # diffusers folds alpha/r = 0.5 into lora_A: the same factors, the same ΔW bitwise
        assert torch.equal(theirs[f"{n}.lora_A.weight"], 0.5 * A) and torch.equal(theirs[f"{n}.lora_B.weight"], ours[n].B)


def test_xlabs_reads_as_diffusers_applies_it(base, tmp_path):
    model, g, tensors = _model(), torch.Generator().manual_seed(3), {}
    for src, (rows, inp) in _fused_shapes(XLABS, model).items():
        tensors[f"{src}.down.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{src}.up.weight"] = torch.randn(rows, 2, generator=g)
    save_file(tensors, tmp_path / "x.safetensors")
    applied = applied_deltas(load_into(FluxLoraLoaderMixin, tmp_path / "x.safetensors", transformer=_model(), text_encoder=None))
    ours = our_deltas(tmp_path / "x.safetensors")
    assert sorted(applied) == sorted(ours) and len(ours) == 12
    assert max_diff(applied, ours) == 0.0  # no alpha: the same factors, the same ΔW


def test_bfl_layout_matches_diffusers_control_lora_converter(tmp_path):
    """diffusers' BFL converter wants every Flux.1-dev module (19 + 38 blocks of width 3072): rank 2 keeps that small."""
    g, tensors = torch.Generator().manual_seed(4), {}
    h = 3072
    shapes = {"img_in": (h, 64), "txt_in": (h, 4096), "final_layer.linear": (64, h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    for p in ("time_in", "vector_in", "guidance_in"):
        shapes |= {f"{p}.in_layer": (h, 256 if p != "vector_in" else 768), f"{p}.out_layer": (h, h)}
    for i in range(19):
        for s in ("img", "txt"):
            shapes |= {f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h), f"double_blocks.{i}.{s}_attn.proj": (h, h)}
            shapes |= {
                f"double_blocks.{i}.{s}_mlp.0": (4 * h, h),
                f"double_blocks.{i}.{s}_mlp.2": (h, 4 * h),
                f"double_blocks.{i}.{s}_mod.lin": (6 * h, h),
            }
            for n in ("query", "key"):
                tensors[f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale"] = torch.ones(128)
    for i in range(38):
        shapes |= {
            f"single_blocks.{i}.linear1": (7 * h, h),
            f"single_blocks.{i}.linear2": (h, 5 * h),
            f"single_blocks.{i}.modulation.lin": (3 * h, h),
        }
        for n in ("query", "key"):
            tensors[f"single_blocks.{i}.norm.{n}_norm.scale"] = torch.ones(128)
    for src, (rows, inp) in shapes.items():
        tensors[f"{src}.lora_A.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{src}.lora_B.weight"] = torch.randn(rows, 2, generator=g)
    theirs = conv._convert_bfl_flux_control_lora_to_diffusers(dict(tensors))
    lora = {k: v for k, v in tensors.items() if "norm.scale" not in k and "_norm." not in k}
    save_file(lora, tmp_path / "bfl.safetensors")
    ours = loratools.load(tmp_path / "bfl.safetensors").modules
    theirs_modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert sorted(ours) == sorted(theirs_modules) and len(ours) == 19 * 14 + 38 * 6 + 10
    for name, m in ours.items():
        A, B = theirs[f"{name}.lora_A.weight"], theirs[f"{name}.lora_B.weight"]
        if name == "transformer.norm_out.linear":
            # diffusers 0.42 swaps the halves of lora_A's rank rows too (swap_scale_shift on both factors), which changes
            # ΔW; the right ΔW swaps the (shift, scale) row halves of B·A, which is swapping B's row halves alone
            fused_B = tensors["final_layer.adaLN_modulation.1.lora_B.weight"]
            assert torch.equal(m.A, tensors["final_layer.adaLN_modulation.1.lora_A.weight"])
            assert torch.equal(m.B, torch.cat([fused_B[h:], fused_B[:h]])) and torch.equal(B, m.B) and not torch.equal(A, m.A)
            continue
        assert torch.equal(m.A, A) and torch.equal(m.B, B) and m.scale == 1.0  # bitwise the same factors


def test_diffusers_applies_all_of_our_diffusers_output_of_a_kohya_flux_file(tmp_path):
    """Read through our table, every module (embedders, final layer, linear1 too) reaches diffusers' model."""
    lora = _kohya_file(tmp_path / "k.safetensors", _factors(_fused_shapes(BFL, _model())))
    loratools.convert(lora, tmp_path / "d.safetensors", to="diffusers")
    applied = applied_deltas(load_into(FluxLoraLoaderMixin, tmp_path / "d.safetensors", transformer=_model(), text_encoder=None))
    ours = our_deltas(lora)
    assert sorted(applied) == sorted(ours) and len(ours) == 30
    assert max_diff(applied, ours) < 1e-6


def test_kohya_output_fuses_back_bitwise(tmp_path):
    factors = _factors(_fused_shapes(BFL, _model()))
    lora = _kohya_file(tmp_path / "k.safetensors", factors)
    loratools.convert(lora, tmp_path / "d.safetensors", to="diffusers")
    loratools.convert(tmp_path / "d.safetensors", tmp_path / "back.safetensors", to="kohya")
    src, back = load_file(lora), load_file(tmp_path / "back.safetensors")
    for key, tensor in src.items():  # diffusers output folds alpha/r into B; back in kohya it stays folded
        if key.endswith(".lora_down.weight"):
            up = key.replace("lora_down", "lora_up")
            alpha = key.replace(".lora_down.weight", ".alpha")
            ours = back[alpha] / tensor.shape[0] * back[up] @ back[key]
            assert torch.allclose(ours, src[alpha] / tensor.shape[0] * src[up] @ tensor, atol=1e-6, rtol=0)
    assert sorted(src) == sorted(back)
    loratools.convert(lora, tmp_path / "same.safetensors", to="kohya")  # read as kohya: written straight back
    same = load_file(tmp_path / "same.safetensors")
    assert all(torch.equal(same[k], v) for k, v in src.items())


def test_a_module_no_table_row_maps_is_named(tmp_path):
    tensors = {
        f"double_blocks.0.img_attn.{m}.lora_{r}.weight": torch.ones(*s) for m in ("qkv", "norm") for r, s in (("A", (1, 4)), ("B", (12, 1)))
    }
    save_file(tensors, tmp_path / "u.safetensors")
    with pytest.raises(FormatError, match=r"1 module\(s\) have no flux .*double_blocks\.0\.img_attn\.norm"):
        loratools.load(tmp_path / "u.safetensors")


def test_hunyuan_video_double_blocks_are_no_flux_file(tmp_path):
    """HunyuanVideo also names double_blocks, with no Flux module among them: read as diffusers keys, as before."""
    save_file(
        {"double_blocks.0.img_attn_qkv.lora_A.weight": torch.ones(1, 4), "double_blocks.0.img_attn_qkv.lora_B.weight": torch.ones(12, 1)},
        tmp_path / "h.safetensors",
    )
    assert list(loratools.load(tmp_path / "h.safetensors").modules) == ["double_blocks.0.img_attn_qkv"]


def test_kohya_flux_merges_the_same_into_a_bfl_layout_base(base, tmp_path):
    """Onto flux1-dev's own layout (``double_blocks.0.img_attn.qkv.weight``) modules keep BFL's fused names."""
    state = load_file(base)
    save_file({k: v.contiguous() for k, v in original_checkpoint(state, BFL, 1, {}).items()}, tmp_path / "bfl.safetensors")
    factors = _factors(_fused_shapes(BFL, _model()))
    lora = _kohya_file(tmp_path / "k.safetensors", factors)
    assert sorted(loratools.load(lora, base=tmp_path / "bfl.safetensors").modules) == sorted(factors)
    loratools.merge(base, [lora], out=tmp_path / "d.safetensors")
    loratools.merge(tmp_path / "bfl.safetensors", [lora], out=tmp_path / "o.safetensors")
    via_diffusers = original_checkpoint(load_file(tmp_path / "d.safetensors"), BFL, 1, {})
    merged = load_file(tmp_path / "o.safetensors")
    assert sorted(via_diffusers) == sorted(merged)
    diff = max(float((via_diffusers[k] - v).abs().max()) for k, v in merged.items())
    assert diff < 1e-6, diff


def test_cli_names_every_unmapped_module_in_one_line(tmp_path):
    one, two = torch.ones(1, 4), torch.ones(4, 1)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": one,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(12, 1),
    }
    for name in ("lora_unet_double_blocks_0_img_attn_norm", "lora_unet_single_blocks_0_norm_key"):
        tensors |= {f"{name}.lora_down.weight": one, f"{name}.lora_up.weight": two}
    save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / "k.safetensors")
    result = CliRunner().invoke(
        main, ["convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 3 and len(result.stderr.strip().splitlines()) == 1
    assert "2 module(s) have no flux (kohya layout) counterpart" in result.stderr
    assert "lora_unet_double_blocks_0_img_attn_norm" in result.stderr and "lora_unet_single_blocks_0_norm_key" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
