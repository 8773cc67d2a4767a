"""kohya/sd-scripts files: reading (alpha rules, conv, DoRA, LyCORIS refusals), name mapping, writing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loratools
from loratools.errors import FormatError, InvalidAdapterError, SpecError
from loratools.formats.kohya import META_SOURCE, kohya_name, map_names

from ..factories import GiB, in_subprocess

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."


def _sd_base(path):
    """A tiny SD1-style single-file checkpoint: a 3x3 conv, a 1x1 conv, a linear, a CLIP projection, a norm."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        UNET + "input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        UNET + "input_blocks.0.0.bias": torch.randn(8, generator=g),
        UNET + "input_blocks.1.1.proj_in.weight": torch.randn(8, 8, 1, 1, generator=g),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g),
        UNET + "input_blocks.1.1.norm.weight": torch.ones(8),
        TE + "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
    }
    save_file(tensors, str(path))
    return tensors


def _kohya_modules():
    """kohya name -> (down, up, alpha or None); ranks 2 and 3, alphas 1, 0.5, missing."""
    g = torch.Generator().manual_seed(1)
    return {
        "lora_unet_input_blocks_0_0": (torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g), 1.0),
        "lora_unet_input_blocks_1_1_proj_in": (torch.randn(3, 8, 1, 1, generator=g), torch.randn(8, 3, 1, 1, generator=g), None),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 0.5),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.randn(2, 6, generator=g), torch.randn(6, 2, generator=g), None),
    }


def _write_kohya(path, modules, metadata=None, extra=None):
    tensors = {}
    for name, (down, up, alpha) in modules.items():
        tensors[name + ".lora_down.weight"] = down
        tensors[name + ".lora_up.weight"] = up
        if alpha is not None:
            tensors[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata or {"ss_network_dim": "2", "ss_output_name": "tiny"})
    return path


def _reference_delta(down, up, alpha):
    """ΔW as sd-scripts applies it: alpha/r · up·down (missing alpha = r), in the base weight's shape."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    dense = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return scale * dense.reshape(up.shape[0], *down.shape[1:])


def _read_file(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def test_missing_alpha_means_rank(tmp_path):
    down, up = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    adapter = loratools.load(_write_kohya(tmp_path / "k.safetensors", {"lora_unet_x": (down, up, None)}))
    module = adapter.modules["lora_unet_x"]
    assert (module.rank, module.alpha, module.scale) == (2, 2.0, 1.0)
    assert torch.equal(module.delta(), torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))


def test_without_base_names_stay_and_source_is_recorded(tmp_path):
    adapter = loratools.load(_write_kohya(tmp_path / "k.safetensors", _kohya_modules()))
    assert sorted(adapter.modules) == sorted(_kohya_modules())
    assert adapter.metadata[META_SOURCE] == "kohya" and adapter.metadata["ss_output_name"] == "tiny"
    assert loratools.source_format(adapter) == "kohya"
    assert adapter.modules["lora_unet_input_blocks_0_0"].kind == "conv"


def test_round_trip_kohya_spec_kohya_keeps_every_delta(tmp_path):
    modules = _kohya_modules()
    src = _write_kohya(tmp_path / "k.safetensors", modules)
    _sd_base(tmp_path / "base.safetensors")  # maps kohya names to module paths, so the spec adapter loads in PEFT
    loratools.convert(src, tmp_path / "spec", to="peft", base=tmp_path / "base.safetensors")
    back = tmp_path / "back.safetensors"
    loratools.convert(tmp_path / "spec", back, to="kohya")
    tensors, meta = _read_file(back)
    for name, (down, up, alpha) in modules.items():
        got = _reference_delta(tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"], float(tensors[name + ".alpha"]))
        assert torch.allclose(got, _reference_delta(down, up, alpha), rtol=0, atol=1e-6), name
        assert tensors[name + ".alpha"].dtype == torch.float32 and tensors[name + ".alpha"].dim() == 0
        if alpha is None:  # missing alpha is written out as the rank it meant
            assert float(tensors[name + ".alpha"]) == down.shape[0]
    assert len(tensors) == 3 * len(modules)
    assert meta["ss_output_name"] == "tiny"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")  # ranks 2 and 3, alphas differ
    assert loratools.validate(back).ok


def test_uniform_rank_and_alpha_metadata_is_exact(tmp_path):
    g = torch.Generator().manual_seed(2)
    modules = {f"lora_unet_b{i}": (torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g), 8.0) for i in range(2)}
    out = loratools.save_as(loratools.load(_write_kohya(tmp_path / "k.safetensors", modules)), tmp_path / "o.safetensors")
    _, meta = _read_file(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "8", "networks.lora")


def test_base_maps_names_and_delta_lands_on_the_right_base_tensor(tmp_path):
    """The merge reference: W + ΔW from the mapped adapter equals W + alpha/r·up·down per base key (conv included)."""
    base = _sd_base(tmp_path / "base.safetensors")
    modules = _kohya_modules()
    adapter = loratools.load(_write_kohya(tmp_path / "k.safetensors", modules), base=tmp_path / "base.safetensors")
    expected = {
        "lora_unet_input_blocks_0_0": UNET + "input_blocks.0.0",
        "lora_unet_input_blocks_1_1_proj_in": UNET + "input_blocks.1.1.proj_in",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": TE + "text_model.encoder.layers.0.self_attn.q_proj",
    }
    assert sorted(adapter.modules) == sorted(expected.values())
    for name, (down, up, alpha) in modules.items():
        key = expected[name] + ".weight"
        merged = base[key] + adapter.modules[expected[name]].delta()
        assert torch.allclose(merged, base[key] + _reference_delta(down, up, alpha), atol=1e-6), name
    assert loratools.validate(tmp_path / "k.safetensors", base=tmp_path / "base.safetensors").ok


def test_kohya_file_merges_into_sd_checkpoint_like_the_dense_reference(tmp_path):
    """End to end: `loratools.merge` of a kohya file (conv 3x3, conv 1x1, linear, text encoder) equals W + alpha/r·up·down."""
    from safetensors.torch import load_file

    base = _sd_base(tmp_path / "base.safetensors")
    modules = _kohya_modules()
    src = _write_kohya(tmp_path / "k.safetensors", modules)
    result = loratools.merge(tmp_path / "base.safetensors", [src], out=tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == set(base) and len(result.merged) == len(modules)
    keys = {
        "lora_unet_input_blocks_0_0": UNET + "input_blocks.0.0.weight",
        "lora_unet_input_blocks_1_1_proj_in": UNET + "input_blocks.1.1.proj_in.weight",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": TE + "text_model.encoder.layers.0.self_attn.q_proj.weight",
    }
    for name, (down, up, alpha) in modules.items():
        torch.testing.assert_close(merged[keys[name]], base[keys[name]] + _reference_delta(down, up, alpha), atol=1e-6, rtol=0)
    untouched = set(base) - set(keys.values())
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)


def test_mapped_adapter_writes_back_the_same_kohya_names(tmp_path):
    _sd_base(tmp_path / "base.safetensors")
    src = _write_kohya(tmp_path / "k.safetensors", _kohya_modules())
    loratools.convert(src, tmp_path / "back.safetensors", to="kohya", base=tmp_path / "base.safetensors")
    assert set(_read_file(tmp_path / "back.safetensors")[0]) == set(_read_file(src)[0]) | {
        "lora_unet_input_blocks_1_1_proj_in.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }


def test_unmapped_names_are_listed(tmp_path):
    _sd_base(tmp_path / "base.safetensors")
    modules = dict(_kohya_modules())
    modules["lora_unet_output_blocks_9_0"] = (torch.ones(1, 8), torch.ones(8, 1), None)
    modules["lora_te2_text_model_encoder_layers_0_mlp_fc1"] = (torch.ones(1, 6), torch.ones(6, 1), None)
    src = _write_kohya(tmp_path / "k.safetensors", modules)
    with pytest.raises(InvalidAdapterError) as info:
        loratools.load(src, base=tmp_path / "base.safetensors")
    listed = {p.where.removeprefix("base_model.model.") for p in info.value.problems if p.code == "base-unmatched"}
    assert listed == {"lora_unet_output_blocks_9_0", "lora_te2_text_model_encoder_layers_0_mlp_fc1"}
    report = loratools.validate(src, base=tmp_path / "base.safetensors")
    assert sorted(p.code for p in report.errors) == ["base-unmatched", "base-unmatched"]
    _, unmapped = map_names(modules, tmp_path / "base.safetensors")
    assert set(unmapped) == listed


def test_ambiguous_flattening_is_not_guessed(tmp_path):
    save_file({"a_b.c.weight": torch.zeros(2, 2), "a.b_c.weight": torch.zeros(2, 2)}, str(tmp_path / "base.safetensors"))
    mapped, unmapped = map_names(["lora_unet_a_b_c"], tmp_path / "base.safetensors")
    assert mapped == {} and "several base modules" in unmapped["lora_unet_a_b_c"]


def test_dora_scale_round_trips(tmp_path):
    down, up = torch.randn(2, 5), torch.randn(3, 2)
    magnitude = torch.tensor([[1.0], [2.0], [3.0]])
    src = _write_kohya(tmp_path / "k.safetensors", {"lora_unet_x": (down, up, 2.0)}, extra={"lora_unet_x.dora_scale": magnitude})
    adapter = loratools.load(src)
    assert torch.equal(adapter.modules["lora_unet_x"].magnitude, torch.tensor([1.0, 2.0, 3.0]))
    assert adapter.peft_config()["use_dora"] is True
    tensors, _ = _read_file(loratools.save_as(adapter, tmp_path / "o.safetensors"))
    assert torch.equal(tensors["lora_unet_x.dora_scale"], magnitude)


@pytest.mark.parametrize(
    ("out", "inp", "shape", "args", "axis"),
    [
        (4, 4, (4, 1), None, "out"),  # LyCORIS wd_on_output=True: rows' norms, (out, 1)
        (4, 4, (1, 4), None, "in"),  # wd_on_output=False (kohya-trained LyCORIS, OneTrainer): columns' norms, (1, in)
        (4, 4, (4,), {"wd_on_output": "False"}, "in"),  # a flat vector on a square layer: the metadata tells
        (4, 4, (4,), {"wd_on_output": True}, "out"),
        (3, 5, (5,), None, "in"),  # a flat vector on a non-square layer: its length tells
        (3, 5, (3,), None, "out"),
        (1, 5, (1, 1), None, "out"),
        (5, 1, (1, 1), None, "in"),
    ],
)
def test_dora_axis_is_told_from_shape_and_metadata(tmp_path, out, inp, shape, args, axis):
    metadata = {"ss_network_args": json.dumps(args)} if args else None
    magnitude = torch.arange(1.0, 1.0 + math.prod(shape)).reshape(shape)
    src = _write_kohya(
        tmp_path / "k.safetensors",
        {"lora_unet_x": (torch.ones(2, inp), torch.ones(out, 2), None)},
        metadata,
        {"lora_unet_x.dora_scale": magnitude},
    )
    m = loratools.load(src).modules["lora_unet_x"]
    assert m.magnitude_axis == axis and torch.equal(m.magnitude, magnitude.reshape(-1))


@pytest.mark.parametrize(("shape", "code"), [((4,), "dora-ambiguous"), ((2, 2), "bad-shape"), ((4, 4), "bad-shape")])
def test_dora_scale_that_says_no_axis_is_refused(tmp_path, shape, code):
    src = _write_kohya(
        tmp_path / "k.safetensors",
        {"lora_unet_x": (torch.ones(2, 4), torch.ones(4, 2), None)},
        None,
        {"lora_unet_x.dora_scale": torch.ones(shape)},
    )
    with pytest.raises(FormatError, match="dora_scale") as info:
        loratools.load(src)
    assert info.value.code == code and info.value.key == "lora_unet_x.dora_scale"


def test_in_axis_dora_stays_in_axis_in_kohya_and_is_refused_by_peft(tmp_path):
    magnitude = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    src = _write_kohya(
        tmp_path / "k.safetensors", {"lora_unet_x": (torch.ones(2, 4), torch.ones(4, 2), None)}, None, {"lora_unet_x.dora_scale": magnitude}
    )
    adapter = loratools.load(src)
    tensors, _ = _read_file(loratools.save_as(adapter, tmp_path / "o.safetensors", to="kohya"))
    assert torch.equal(tensors["lora_unet_x.dora_scale"], magnitude)  # (1, in) as LyCORIS stores it
    assert loratools.load(tmp_path / "o.safetensors").modules["lora_unet_x"].magnitude_axis == "in"
    assert loratools.summarize(adapter).modules[0].dora_axis == "in"
    for fmt in ("peft", "diffusers"):
        with pytest.raises(SpecError, match="along in_features") as info:
            loratools.save_as(adapter, tmp_path / f"{fmt}.safetensors", to=fmt)
        assert info.value.code == "dora-axis" and not (tmp_path / f"{fmt}.safetensors").exists()


@pytest.mark.parametrize(
    ("keys", "what"),
    [(("lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.lora_mid.weight"), "lora_mid")],
)
def test_tucker_core_that_does_not_chain_is_refused(tmp_path, keys, what):
    save_file({k: torch.ones(2, 2) for k in keys}, str(tmp_path / "l.safetensors"))
    with pytest.raises(FormatError, match=what):
        loratools.load(tmp_path / "l.safetensors")
    assert loratools.validate(tmp_path / "l.safetensors").problems[0].code == "bad-shape"


def test_unknown_tensors_and_half_modules_are_refused(tmp_path):
    save_file(
        {"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1), "junk": torch.ones(1)},
        str(tmp_path / "a.safetensors"),
    )
    with pytest.raises(FormatError, match="junk"):
        loratools.load(tmp_path / "a.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(FormatError, match=r"no lora_B \(lora_up/up\)"):
        loratools.load(tmp_path / "b.safetensors")


def test_kohya_names_of_module_paths():
    assert kohya_name(UNET + "input_blocks.4.1.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert kohya_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_name("text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_name("text_encoder.text_model.x", te_prefix="lora_te1_") == "lora_te1_text_model_x"
    assert kohya_name("lora_unet_already_flat") == "lora_unet_already_flat"
    assert kohya_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_rslora_and_modules_to_save_on_the_way_to_kohya(tmp_path):
    rs = loratools.LoraModule(torch.ones(4, 3), torch.ones(2, 4), 8.0, rslora=True)
    out = loratools.save_as(loratools.Adapter({"unet.a": rs}), tmp_path / "o.safetensors", to="kohya")
    tensors, _ = _read_file(out)
    assert float(tensors["lora_unet_a.alpha"]) == pytest.approx(16.0)  # alpha·sqrt(r): alpha/r then equals 8/sqrt(4)
    with pytest.raises(FormatError, match="modules_to_save"):
        loratools.save_as(
            loratools.Adapter({"a": rs}, {}, {"base_model.model.norm.weight": torch.ones(2)}), tmp_path / "x.safetensors", to="kohya"
        )


def test_alpha_zero_means_alpha_equals_rank_as_in_sd_scripts(tmp_path):
    # sd-scripts networks/lora.py: `alpha = self.lora_dim if alpha is None or alpha == 0 else alpha`
    down, up = torch.ones(2, 3), torch.ones(4, 2)
    save_file(
        {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up, "lora_unet_x.alpha": torch.tensor(0.0)},
        tmp_path / "z.safetensors",
    )
    assert loratools.load(tmp_path / "z.safetensors").modules["lora_unet_x"].scale == 1.0
    # and a zero scale is written so that it reads back as zero, not as alpha = rank
    zero = loratools.scale(loratools.load(tmp_path / "z.safetensors"), 0.0)
    loratools.save_as(zero, tmp_path / "zero.safetensors")
    back = loratools.load(tmp_path / "zero.safetensors").modules["lora_unet_x"]
    assert torch.equal(back.delta(), torch.zeros(4, 3))


def test_map_names_over_a_100k_key_base_is_linear_under_1_gib(tmp_path):
    code = f"""
    import time
    from loratools.formats.kohya import map_names
    from tests.factories import tiny_checkpoint
    paths = [f"down_blocks.{{i // 10}}.attentions.{{i % 10}}.proj_in" for i in range(100_000)]
    tiny_checkpoint({str(tmp_path / "base.safetensors")!r}, [f"model.diffusion_model.{{p}}.weight" for p in paths])
    names = ["lora_unet_" + p.replace(".", "_") for p in paths]
    start = time.process_time()
    mapped, unmapped = map_names(names, {str(tmp_path / "base.safetensors")!r})
    result = {{"mapped": len(mapped), "unmapped": len(unmapped), "first": mapped[names[0]], "cpu": time.process_time() - start}}
    """
    result, rss = in_subprocess(code)
    assert (result["mapped"], result["unmapped"]) == (100_000, 0)
    assert result["first"] == "model.diffusion_model.down_blocks.0.attentions.0.proj_in"
    assert rss < GiB
    print(f"kohya map_names over 100k keys: {result['cpu']:.1f} s CPU, peak RSS {rss / 2**20:.0f} MiB")
