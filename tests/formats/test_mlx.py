"""mlx-lm adapters: reading (mlx-lm's fuse formula), writing (its config fields), exact round trips, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loratools
from loratools.errors import FormatError
from loratools.spec import alpha_for

from ..factories import make_adapter, random_module

LAYER = "model.layers.{}.{}"


def _mlx_dir(path, *, scale=20.0, rank=4, fine_tune_type="lora", extra=None, dtype=torch.float32):
    """An adapter laid out as mlx-lm's trainer saves one: lora_a (in x r), lora_b (r x out), one scale."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(2):
        for key, (inp, out) in {"self_attn.q_proj": (8, 8), "self_attn.v_proj": (8, 4), "mlp.down_proj": (12, 8)}.items():
            tensors[LAYER.format(i, key) + ".lora_a"] = torch.randn(inp, rank, generator=g).to(dtype)
            tensors[LAYER.format(i, key) + ".lora_b"] = torch.randn(rank, out, generator=g).to(dtype)
    tensors.update(extra or {})
    path.mkdir()
    save_file(tensors, str(path / "adapters.safetensors"), metadata={"format": "mlx"})
    config = {
        "fine_tune_type": fine_tune_type,
        "num_layers": 16,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": 0.05,
            "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
        },
        "model": "tiny-llama",
        "iters": 100,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_read_applies_mlx_fuse_formula(tmp_path):
    tensors = _mlx_dir(tmp_path / "mlx", scale=0.7)
    adapter = loratools.load(tmp_path / "mlx")
    assert len(adapter.modules) == 6
    assert adapter.metadata["loratools.source_format"] == "mlx"
    for name, m in adapter.modules.items():
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        # mlx_lm/tuner/lora.py LoRALinear.fuse: delta = (scale * lora_b.T) @ lora_a.T
        reference = (0.7 * b.T.double()) @ a.T.double()
        assert m.scale == 0.7 and m.rank == 4
        assert torch.equal(m.A, a.T) and torch.equal(m.B, b.T)
        assert torch.allclose(m.delta().double(), reference, rtol=1e-6, atol=1e-6)


def test_bare_file_reads_with_config_beside_it(tmp_path):
    _mlx_dir(tmp_path / "mlx")
    assert len(loratools.load(tmp_path / "mlx" / "adapters.safetensors").modules) == 6


def test_mlx_to_peft_to_mlx_is_bit_exact(tmp_path):
    tensors = _mlx_dir(tmp_path / "mlx", scale=0.3, rank=3, dtype=torch.bfloat16)
    loratools.convert(tmp_path / "mlx", tmp_path / "peft", to="peft")
    peft = loratools.load(tmp_path / "peft")
    assert {m.scale for m in peft.modules.values()} == {0.3}
    loratools.convert(tmp_path / "peft", tmp_path / "back", to="mlx")
    back = _read(tmp_path / "back" / "adapters.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == torch.bfloat16 for k in tensors)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 0.3 and config["lora_parameters"]["rank"] == 3
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1


def test_peft_to_mlx_to_peft_is_exact(tmp_path):
    modules = {
        LAYER.format(0, "self_attn.q_proj"): random_module(6, 5, 3, alpha=7.0, seed=1),
        LAYER.format(3, "mlp.up_proj"): random_module(9, 6, 3, alpha=7.0, seed=2),
        "lm_head": random_module(11, 6, 3, alpha=7.0, seed=3),
    }
    source = make_adapter(modules)
    loratools.save(source, tmp_path / "peft")
    loratools.convert(tmp_path / "peft", tmp_path / "mlx", to="mlx")
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    # every block wrapped, block-relative keys, model-level modules by full name (mlx_lm/tuner/utils.py)
    assert config["num_layers"] == -1
    assert config["lora_parameters"]["keys"] == ["lm_head", "mlp.up_proj", "self_attn.q_proj"]
    assert config["lora_parameters"]["scale"] == 7.0 / 3
    stored = _read(tmp_path / "mlx" / "adapters.safetensors")
    assert stored[LAYER.format(3, "mlp.up_proj") + ".lora_a"].shape == (6, 3)
    assert stored[LAYER.format(3, "mlp.up_proj") + ".lora_b"].shape == (3, 9)
    back = loratools.load(tmp_path / "mlx")
    for name, m in modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
        assert back.modules[name].scale == m.scale
        assert torch.equal(back.modules[name].delta(), m.delta())


@pytest.mark.parametrize("scale", [0.1, 1 / 3, 20.0, 2.0**-30, 12345.678])
@pytest.mark.parametrize("rank", [1, 3, 7, 48])
def test_alpha_for_gives_the_scale(scale, rank):
    """alpha/r is the scale exactly where a float alpha allows (0.1·3 has none), always within one ulp and equal in float32."""
    got = alpha_for(scale, rank) / rank
    assert abs(got - scale) <= math.ulp(scale)
    assert torch.tensor(got, dtype=torch.float32) == torch.tensor(scale, dtype=torch.float32)
    if (scale, rank) in ((20.0, 7), (1 / 3, 3), (2.0**-30, 48), (0.1, 1)):
        assert got == scale


def test_missing_config_refused(tmp_path):
    _mlx_dir(tmp_path / "mlx")
    (tmp_path / "mlx" / "adapter_config.json").unlink()
    with pytest.raises(FormatError, match="adapter_config.json beside it"):
        loratools.load(tmp_path / "mlx")


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_non_lora_fine_tunes_refused(tmp_path, kind):
    _mlx_dir(tmp_path / "mlx", fine_tune_type=kind)
    with pytest.raises(FormatError, match=f"fine_tune_type '{kind}'"):
        loratools.load(tmp_path / "mlx")


@pytest.mark.parametrize("scale", [None, "2", float("nan"), True])
def test_bad_scale_refused(tmp_path, scale):
    _mlx_dir(tmp_path / "mlx", scale=scale)
    with pytest.raises(FormatError, match="lora_parameters.scale"):
        loratools.load(tmp_path / "mlx")


def test_switch_linear_and_unknown_tensors_refused(tmp_path):
    experts = {
        "model.layers.0.mlp.switch_mlp.up_proj.lora_a": torch.zeros(2, 4, 8),
        "model.layers.0.mlp.switch_mlp.up_proj.lora_b": torch.zeros(2, 8, 4),
    }
    _mlx_dir(tmp_path / "moe", extra=experts)
    with pytest.raises(FormatError, match="SwitchLinear"):
        loratools.load(tmp_path / "moe")
    _mlx_dir(tmp_path / "dora", extra={"model.layers.0.self_attn.q_proj.m": torch.ones(8)})
    with pytest.raises(FormatError, match="not a lora_a/lora_b factor"):
        loratools.load(tmp_path / "dora")


def test_half_pair_and_bad_shapes_refused(tmp_path):
    _mlx_dir(tmp_path / "half", extra={"model.layers.5.self_attn.q_proj.lora_a": torch.zeros(8, 4)})
    with pytest.raises(FormatError, match="model.layers.5.self_attn.q_proj"):
        loratools.load(tmp_path / "half")
    bad = {"model.layers.5.self_attn.q_proj.lora_a": torch.zeros(8, 4), "model.layers.5.self_attn.q_proj.lora_b": torch.zeros(3, 8)}
    _mlx_dir(tmp_path / "bad", extra=bad)
    with pytest.raises(FormatError, match="lora_a \\[8, 4\\] and lora_b \\[3, 8\\]"):
        loratools.load(tmp_path / "bad")


def test_writer_refuses_what_mlx_cannot_load(tmp_path):
    mixed = make_adapter({LAYER.format(0, "q_proj"): random_module(rank=2), LAYER.format(1, "q_proj"): random_module(rank=3)})
    with pytest.raises(FormatError, match="one rank and one scale"):
        loratools.save_as(mixed, tmp_path / "mixed", to="mlx")
    conv = make_adapter({"unet.conv": random_module(kernel=(3, 3))})
    with pytest.raises(FormatError, match="plain linear LoRA only"):
        loratools.save_as(conv, tmp_path / "conv", to="mlx")
    kohya = make_adapter({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": random_module()})
    with pytest.raises(FormatError, match="kohya name"):
        loratools.save_as(kohya, tmp_path / "kohya", to="mlx")
    assert not any((tmp_path / n).exists() for n in ("mixed", "conv", "kohya"))
