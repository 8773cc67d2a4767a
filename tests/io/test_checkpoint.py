import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratools.errors import FormatError
from loratools.io.checkpoint import find_weight, module_index, open_checkpoint

from ..factories import GiB, in_subprocess


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


def _scan(module: str, modules: dict[str, str]) -> str | None:
    """The rule as a scan over every base module (the reference the suffix index must agree with)."""
    for name in (module, module.removesuffix(".base_layer")):
        if name in modules:
            return modules[name]
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if ".".join(parts[i:]) in modules:
                return modules[".".join(parts[i:])]
        longer = [key for base, key in modules.items() if base.endswith("." + name)]
        if len(longer) == 1:
            return longer[0]
    return None


PATHS = st.lists(st.sampled_from(["a", "b", "x", "base_layer"]), min_size=1, max_size=4).map(".".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(PATHS, max_size=8), st.lists(PATHS, min_size=1, max_size=6))
def test_find_weight_agrees_with_a_scan_of_every_key(bases, modules):
    index = module_index([b + ".weight" for b in bases] + ["x.bias"])
    reference = {b: b + ".weight" for b in bases}
    assert [find_weight(m, index) for m in modules] == [_scan(m, reference) for m in modules]


def test_100k_key_base_with_prefixed_names_plans_in_linear_time_under_1_gib(tmp_path):
    code = f"""
    import time
    import torch
    from loratools.adapter import Adapter, LoraModule
    from loratools.io.checkpoint import open_checkpoint
    from loratools.planner import plan
    from tests.factories import tiny_checkpoint
    names = [f"model.layers.{{i // 4}}.{{p}}" for i, p in zip(range(100_000), ["q", "k", "v", "o"] * 25_000)]
    tiny_checkpoint({str(tmp_path / "base.safetensors")!r}, [f"transformer.{{n}}.weight" for n in names])
    A, B = torch.ones(1, 1), torch.ones(1, 1)
    adapter = Adapter({{n: LoraModule(A, B, 1.0, False, "linear") for n in names}}, {{}})
    start = time.process_time()
    result = plan(open_checkpoint({str(tmp_path / "base.safetensors")!r}), [adapter])
    result = {{"edits": len(result.edits), "problems": len(result.problems), "cpu": time.process_time() - start}}
    """
    result, rss = in_subprocess(code)
    assert result == {"edits": 100_000, "problems": 0, "cpu": result["cpu"]}  # every module found under its prefix
    assert rss < GiB
    print(f"100k-key prefixed base: plan {result['cpu']:.1f} s CPU, peak RSS {rss / 2**20:.0f} MiB")


def test_a_diffusers_component_prefix_drops_even_before_a_one_component_name():
    index = module_index(["proj_out.weight", "transformer_blocks.0.attn.to_q.weight"])
    assert find_weight("transformer.proj_out", index) == "proj_out.weight"
    assert find_weight("transformer.transformer_blocks.0.attn.to_q", index) == "transformer_blocks.0.attn.to_q.weight"
    assert find_weight("model.proj_out", index) is None  # only component prefixes: never the last component alone
