import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loratools import spec
from loratools.adapter import Adapter, LoraModule
from loratools.api import load, save
from loratools.errors import InvalidAdapterError, OutputExistsError

from .factories import random_adapter, random_module


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    rank=st.integers(1, 4),
    alpha=st.sampled_from([1.0, 2.5, 16.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    single=st.booleans(),
)
def test_save_load_round_trip(tmp_path_factory, n, rank, alpha, dtype, single):
    adapter = random_adapter(n, rank=rank, alpha=alpha, dtype=dtype)
    path = tmp_path_factory.mktemp("rt") / ("a.safetensors" if single else "a")
    save(adapter, path)
    back = load(path)
    assert list(back.modules) == list(adapter.modules)
    for name, m in adapter.modules.items():
        got = back.modules[name]
        assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B)
        assert got.A.dtype == dtype and got.alpha == alpha and got.rank == rank


def test_saved_files_follow_spec(tmp_path):
    save(random_adapter(1), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [spec.CONFIG_NAME, spec.WEIGHTS_NAME]
    config = json.loads((tmp_path / "a" / spec.CONFIG_NAME).read_text())
    assert not any(k.startswith("loratools") for k in config)
    with safe_open(str(tmp_path / "a" / spec.WEIGHTS_NAME), "pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == "pt" and meta[spec.META_VERSION] == "1.0" and len(meta[spec.META_SHA256]) == 64
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in fh.keys()


def test_per_module_ranks_and_alphas_become_anchored_patterns():
    modules = {
        "model.layers.0.q_proj": random_module(rank=4, alpha=8),
        "model.layers.1.q_proj": random_module(rank=4, alpha=8),
        "model.layers.2.q_proj": random_module(rank=2, alpha=3),
    }
    config = Adapter(modules, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).peft_config()
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {r"^model\.layers\.2\.q_proj": 2}
    assert config["alpha_pattern"] == {r"^model\.layers\.2\.q_proj": 3}
    for name, m in modules.items():
        assert spec.module_rank(config, name) == m.rank and spec.module_alpha(config, name) == m.alpha
        assert spec.targets(config, name)


def test_unchanged_config_passes_through():
    adapter = random_adapter(2, rank=3, alpha=6.0)
    adapter.config["lora_dropout"] = 0.1
    config = adapter.peft_config()
    assert config["target_modules"] == ["q_proj"] and config["lora_dropout"] == 0.1


def test_delta_shapes_and_values():
    m = random_module(out=4, inp=3, rank=2, alpha=4.0)
    dense = 2.0 * m.B @ m.A
    assert torch.allclose(m.delta(), dense)
    assert torch.allclose(m.delta(fan_in_fan_out=True), dense.T)
    emb = LoraModule(torch.randn(2, 10), torch.randn(5, 2), 2.0, kind="embedding")
    assert emb.delta().shape == (10, 5) == emb.delta_shape()
    conv = LoraModule(torch.randn(2, 3, 3, 3), torch.randn(8, 2, 1, 1), 2.0, kind="conv")
    assert conv.delta().shape == (8, 3, 3, 3) == conv.delta_shape()
    assert torch.allclose(conv.delta().reshape(8, -1), conv.B.reshape(8, 2) @ conv.A.reshape(2, -1))


def test_rslora_scale():
    m = random_module(rank=4, alpha=8, rslora=True)
    assert m.scale == 4.0


def test_save_refuses_existing_and_invalid(tmp_path):
    save(random_adapter(1), tmp_path / "a")
    with pytest.raises(OutputExistsError):
        save(random_adapter(1), tmp_path / "a")
    save(random_adapter(1, rank=2), tmp_path / "a", force=True)
    assert load(tmp_path / "a").modules["model.layers.0.self_attn.q_proj"].rank == 2
    bad = random_adapter(1)
    m = bad.modules["model.layers.0.self_attn.q_proj"]
    bad.modules["model.layers.0.self_attn.q_proj"] = LoraModule(m.A, m.B * float("nan"), m.alpha)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        save(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_save_dtype_cast(tmp_path):
    save(random_adapter(1), tmp_path / "a", dtype=torch.bfloat16)
    assert load(tmp_path / "a").modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16
