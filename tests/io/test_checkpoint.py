import json

import pytest
import torch
from safetensors.torch import save_file

from loratools.errors import FormatError
from loratools.io.checkpoint import find_weight, module_index, open_checkpoint


def test_single_file_directory(llama_base):
    ckpt = open_checkpoint(llama_base)
    assert [s.name for s in ckpt.shards] == ["model.safetensors"]
    assert ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert ckpt.index is None
    assert ckpt.total_bytes == sum(t.nbytes for t in ckpt.tensors.values())


def test_sharded_directory(tmp_path):
    save_file({"a.weight": torch.zeros(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(3, 2)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 40},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(tmp_path)
    assert [s.name for s in ckpt.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert list(ckpt.tensors) == ["a.weight", "b.weight"]
    assert ckpt.shard_of("b.weight").name == "model-00002-of-00002.safetensors"


def test_single_safetensors_file(tmp_path):
    save_file({"w.weight": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert list(open_checkpoint(tmp_path / "m.safetensors").tensors) == ["w.weight"]


def test_refusals(tmp_path):
    with pytest.raises(FormatError, match="no such"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FormatError, match="pickle"):
        open_checkpoint(tmp_path)
    with pytest.raises(FormatError, match="must be safetensors"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(FormatError, match="outside"):
        open_checkpoint(tmp_path)


def test_find_weight_tolerates_prefixes():
    index = module_index(["layers.0.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight", "norm.bias"])
    assert find_weight("model.layers.0.q_proj", index) == "layers.0.q_proj.weight"
    assert find_weight("lm_head", index) == "lm_head.weight"
    assert find_weight("embed_tokens", index) == "model.embed_tokens.weight"
    assert find_weight("model.embed_tokens.base_layer", index) == "model.embed_tokens.weight"
    assert find_weight("model.layers.1.q_proj", index) is None
    assert find_weight("norm", index) is None
