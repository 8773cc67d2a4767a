"""loratools.merge against real PEFT merge_and_unload on tiny models built from configs."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import loratools
from loratools import DiskSpaceError, MergeError, OutputExistsError, ShapeError, merge, unmerge
from loratools.io.atomic import TEMP_PREFIX
from loratools.io.tensorfile import read_header
from loratools.merging import default_out

from ..conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[1, 5, 9, 2, 33, 7]])


def _llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    config = tiny_llama_config(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _save_base(model: torch.nn.Module, path: Path, shard: str | None = None) -> Path:
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _make_adapter(model: torch.nn.Module, path: Path, seed: int = 1, **lora: object) -> Path:
    """Train-free adapter: random nonzero B (init_lora_weights=False) and a perturbed DoRA magnitude."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "lora_B" in name and name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(path)
    return path


def _peft_merged(model_cls: type, base: Path, adapters: list[Path], dtype: torch.dtype) -> torch.nn.Module:
    model = model_cls.from_pretrained(base, dtype=dtype)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between same-dtype tensors (as sign-magnitude ints)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(ints).long()
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def _check_against_peft(tmp_path: Path, model_fn, adapters_kwargs: list[dict], *, dtype=torch.float32, shard=None, weights=None):  # type: ignore[no-untyped-def]
    base = _save_base(model_fn(), tmp_path / "base", shard)
    adapters = [_make_adapter(model_fn(), tmp_path / f"a{i}", seed=i + 1, **kw) for i, kw in enumerate(adapters_kwargs)]
    result = merge(base, adapters, out=tmp_path / "out", weights=weights)
    expected = _peft_merged(type(model_fn()), base, adapters, dtype)
    return base, result, expected


LLAMA_CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "use_rslora": True},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj", "gate_proj"],
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"v_proj": 3, "gate_proj": 5.5},
    },
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj", "embed_tokens"], "use_dora": True},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "k_proj"]},
    "lora_bias": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "lora_bias": True},
    "modules_to_save": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_fp32_llama_matches_peft_merge_and_unload(tmp_path: Path, case: str) -> None:
    _, result, expected = _check_against_peft(tmp_path, _llama, [LLAMA_CASES[case]])
    ours = _tensors(result.out)
    ref = expected.state_dict()
    assert ours.keys() == ref.keys()
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= 1e-6
    assert result.merged, "the adapter changed nothing"
    merged_model = LlamaForCausalLM.from_pretrained(result.out).eval()
    with torch.no_grad():
        assert torch.allclose(merged_model(IDS).logits, expected(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_fan_in_fan_out_gpt2_matches_peft(tmp_path: Path, dora: bool) -> None:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_dora": dora}
    _, result, expected = _check_against_peft(tmp_path, _gpt2, [kwargs])
    ours, ref = _tensors(result.out), expected.state_dict()
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ours) <= 1e-6
    with torch.no_grad():
        assert torch.allclose(GPT2LMHeadModel.from_pretrained(result.out)(IDS).logits, expected(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "dora", "embedding", "lora_bias"])
def test_low_precision_sharded_base_is_bit_identical_to_peft(tmp_path: Path, dtype: torch.dtype, case: str) -> None:
    """Measured: bf16 and fp16 merges equal PEFT's bit for bit (PEFT upcasts adapters to fp32 on load, as we compute)."""
    base, result, expected = _check_against_peft(tmp_path, lambda: _llama(dtype), [LLAMA_CASES[case]], dtype=dtype, shard="10KB")
    assert result.shards == len(list(base.glob("*.safetensors"))) > 1
    ours, ref = _tensors(result.out), expected.state_dict()
    assert all(ours[k].dtype == dtype for k in ref)
    assert max(_ulps(ours[k], ref[k]) for k in ref) == 0
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(result.out, dtype=dtype)(IDS).logits
        assert torch.equal(logits, expected(IDS).logits)


class _Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 6, 1)
        self.emb = torch.nn.Embedding(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)).mean() + self.emb.weight.sum()


@pytest.mark.parametrize("dora", [False, True])
def test_conv_1x1_kxk_and_single_file_base(tmp_path: Path, dora: bool) -> None:
    torch.manual_seed(0)
    base = tmp_path / "convs.safetensors"
    save_file(_Convs().state_dict(), base)
    model = _Convs()
    model.load_state_dict(load_file(base))
    adapter = _make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=3, target_modules=["conv1", "conv2", "emb"], use_dora=dora)
    reference = _Convs()
    reference.load_state_dict(load_file(base))
    expected = PeftModel.from_pretrained(reference, adapter).merge_and_unload().state_dict()
    result = merge(base, [adapter])
    assert result.out == default_out(base) == tmp_path / "convs-merged.safetensors"
    ours = _tensors(result.out)
    assert max(float((ours[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    assert not torch.equal(ours["conv1.weight"], load_file(base)["conv1.weight"])


def test_multi_adapter_equals_sequential_peft_merges(tmp_path: Path) -> None:
    kwargs = [LLAMA_CASES["plain"], {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"], "lora_bias": True}]
    _, result, expected = _check_against_peft(tmp_path, _llama, kwargs)
    ours, ref = _tensors(result.out), expected.state_dict()
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) <= 1e-6


def test_adapter_weights_scale_each_delta(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    a1 = _make_adapter(_llama(), tmp_path / "a1", seed=1, **LLAMA_CASES["plain"])
    a2 = _make_adapter(_llama(), tmp_path / "a2", seed=2, r=2, lora_alpha=2, target_modules=["q_proj"])
    out = merge(base, [a1, a2], weights=[0.5, -2.0], out=tmp_path / "out").out
    W, Wm = _tensors(base / "model.safetensors"), _tensors(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    d1 = loratools.load(a1).modules["model.layers.0.self_attn.q_proj"].delta()
    d2 = loratools.load(a2).modules["model.layers.0.self_attn.q_proj"].delta()
    assert torch.allclose(Wm[key], W[key] + 0.5 * d1 - 2.0 * d2, atol=1e-6, rtol=0)
    assert torch.equal(Wm["model.layers.0.self_attn.k_proj.weight"], W["model.layers.0.self_attn.k_proj.weight"])


def test_dora_sharing_a_tensor_with_another_adapter_is_refused(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    dora = _make_adapter(_llama(), tmp_path / "dora", **LLAMA_CASES["dora"])
    plain = _make_adapter(_llama(), tmp_path / "plain", r=2, lora_alpha=2, target_modules=["q_proj"])
    other = _make_adapter(_llama(), tmp_path / "other", r=2, lora_alpha=2, target_modules=["k_proj"])
    with pytest.raises(MergeError, match="q_proj"):
        merge(base, [dora, plain], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert merge(base, [dora, other], out=tmp_path / "ok").merged


def test_unmatched_and_mismatched_modules_fail_before_writing(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    adapter = loratools.load(_make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"]))
    modules = dict(adapter.modules)
    q = modules.pop("model.layers.0.self_attn.q_proj")
    modules["model.layers.0.self_attn.nope_proj"] = q
    modules["model.layers.1.self_attn.q_proj"] = loratools.LoraModule(torch.ones(4, 7), torch.ones(32, 4), 8.0)
    bad = loratools.Adapter(modules, adapter.config)
    with pytest.raises(ShapeError) as info:
        merge(base, [bad], out=tmp_path / "out")
    message = str(info.value)
    assert "2 adapter module(s)" in message and "nope_proj" in message and "[32, 7]" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_output_refusals(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    adapter = _make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"])
    before = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    for bad in (base, base / "sub", tmp_path):
        with pytest.raises(MergeError):
            merge(base, [adapter], out=bad, force=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        merge(base, [adapter], out=tmp_path / "out")
    assert merge(base, [adapter], out=tmp_path / "out", force=True).merged
    assert merge(base, [adapter]).out == tmp_path / "base-merged"
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".loratools-tmp-")]


def test_layout_index_metadata_and_side_files(tmp_path: Path) -> None:
    base = _save_base(_llama(torch.bfloat16), tmp_path / "base", "10KB")
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("hi")
    (base / "pytorch_model.bin").write_bytes(b"stale pickle")
    (base / "original").mkdir()  # as Meta ships: unmerged pickle weights in a subfolder
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale pickle")
    (base / "original" / "params.json").write_text("{}")
    adapter = _make_adapter(_llama(torch.bfloat16), tmp_path / "a", **LLAMA_CASES["plain"])
    out = merge(base, [adapter], out=tmp_path / "out").out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in base.iterdir() if p.name != "pytorch_model.bin")
    assert (out / "extra" / "notes.txt").read_text() == "hi"
    assert sorted(p.name for p in (out / "original").iterdir()) == ["params.json"]
    wide = merge(base, [adapter], out=tmp_path / "fp32", dtype="fp32").out
    wide_sizes = sum(read_header(f).file_size - read_header(f).data_start for f in wide.glob("*.safetensors"))
    assert json.loads((wide / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == wide_sizes
    index, base_index = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, base))
    assert index["weight_map"] == base_index["weight_map"]
    sizes = sum(read_header(f).file_size - read_header(f).data_start for f in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sizes
    for shard in base.glob("*.safetensors"):
        ours, theirs = read_header(out / shard.name), read_header(shard)
        assert list(ours.tensors) == list(theirs.tensors) and ours.metadata == theirs.metadata
        with open(shard, "rb") as a, open(out / shard.name, "rb") as b:  # same header bytes
            assert a.read(theirs.data_start) == b.read(ours.data_start)


def test_dtype_option_casts_every_float_tensor_once(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    adapter = _make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"])
    full = _tensors(merge(base, [adapter], out=tmp_path / "fp32").out)
    result = merge(base, [adapter], out=tmp_path / "bf16", dtype="bf16")
    half = _tensors(result.out)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    assert LlamaForCausalLM.from_pretrained(result.out, dtype=torch.bfloat16)(IDS).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(("dtype", "max_fraction"), [(torch.float32, 0.7), (torch.bfloat16, 0.7), (torch.float16, 0.7)])
def test_unmerge_round_trip_precision(tmp_path: Path, dtype: torch.dtype, max_fraction: float) -> None:
    """W -> merge -> unmerge comes back within one rounding of the merged value: |W - W''| <= eps·|W'|.

    Measured on this model (|ΔW| comparable to |W|): 68% (fp32), 66% (bf16), 66% (fp16) of the
    merged entries come back changed, each within that bound; untouched tensors are bit-identical.
    """
    base = _save_base(_llama(dtype), tmp_path / "base")
    adapter = _make_adapter(_llama(dtype), tmp_path / "a", **LLAMA_CASES["plain"])
    merged = merge(base, [adapter], out=tmp_path / "m")
    back = unmerge(merged.out, adapter, out=tmp_path / "back")
    W, M, R = _tensors(base / "model.safetensors"), _tensors(merged.out), _tensors(back.out)
    eps = torch.finfo(dtype).eps
    for k in merged.merged:
        bound = eps * torch.maximum(M[k].float().abs(), W[k].float().abs())
        assert bool(((R[k].float() - W[k].float()).abs() <= bound).all()), k
    off = sum(int((W[k] != R[k]).sum()) for k in merged.merged) / sum(W[k].numel() for k in merged.merged)
    assert 0 < off <= max_fraction
    assert all(torch.equal(W[k], R[k]) for k in W if k not in merged.merged)


def test_unmerge_refuses_dora_and_modules_to_save(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base")
    for case in ("dora", "modules_to_save"):
        adapter = _make_adapter(_llama(), tmp_path / case, **LLAMA_CASES[case])
        with pytest.raises(MergeError, match="cannot unmerge"):
            unmerge(base, adapter, out=tmp_path / "out")


def test_failure_mid_merge_leaves_no_output_and_no_temp(tmp_path: Path) -> None:
    base = _save_base(_llama(), tmp_path / "base", "10KB")
    adapter = _make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"])

    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(base, [adapter], out=tmp_path / "out", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_too_little_free_space_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loratools.io.mirror as mirror

    base = _save_base(_llama(), tmp_path / "base")
    adapter = _make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"])
    monkeypatch.setattr(mirror.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DiskSpaceError, match=r"needs \d+\.\d KiB free for the output but only 1000 B is"):  # not "0.00 GiB"
        merge(base, [adapter], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


KILL_SCRIPT = """
import os, signal, sys
from loratools import merge
def kill(done, total):
    if done > total // 3:
        os.kill(os.getpid(), signal.SIGKILL)
merge(sys.argv[1], [sys.argv[2]], out=sys.argv[3], progress=kill)
"""


def test_kill_9_mid_merge_leaves_no_output(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the output never appears; its temporary sibling stays until the next
    output into that folder, which removes it (its owner is dead)."""
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"layers.{i}.weight": torch.randn(256, 256) for i in range(24)}, base / "model.safetensors")
    (base / "config.json").write_text("{}")
    gen = torch.Generator().manual_seed(0)
    modules = {
        f"layers.{i}": loratools.LoraModule(torch.randn(4, 256, generator=gen), torch.randn(256, 4, generator=gen), 4.0) for i in range(24)
    }
    loratools.save(
        loratools.Adapter(modules, {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["layers.0"]}), tmp_path / "a"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(base), str(tmp_path / "a"), str(tmp_path / "out")], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]) == 1
    merge(base, [tmp_path / "a"], out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "out"]
    assert (base / "model.safetensors").stat().st_size == struct.unpack("<Q", (base / "model.safetensors").read_bytes()[:8])[
        0
    ] + 8 + 24 * 256 * 256 * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu(tmp_path: Path) -> None:
    base = _save_base(_llama(torch.bfloat16), tmp_path / "base", "10KB")
    adapter = _make_adapter(_llama(torch.bfloat16), tmp_path / "a", **LLAMA_CASES["dora"])
    cpu = _tensors(merge(base, [adapter], out=tmp_path / "cpu", device="cpu").out)
    gpu = merge(base, [adapter], out=tmp_path / "gpu", device="cuda")
    assert gpu.device == "cuda"
    assert max(_ulps(cpu[k], v) for k, v in _tensors(gpu.out).items()) <= 1


@pytest.mark.parametrize("dtype", ["keep", "fp16"])
def test_direct_and_buffered_writes_give_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Direct I/O (zero-copy when dtypes are kept, bounced when a cast moves every offset) and
    buffered writes produce the same bytes, also when untouched tensors pass through in small chunks."""
    import loratools.io.streaming as streaming

    base = _save_base(_llama(), tmp_path / "base", "10KB")
    adapter = _make_adapter(_llama(), tmp_path / "a", **LLAMA_CASES["plain"])
    direct = merge(base, [adapter], out=tmp_path / "direct", dtype=dtype)
    monkeypatch.setattr(streaming, "_CHUNK", 1000)
    buffered = merge(base, [adapter], out=tmp_path / "buffered", dtype=dtype, direct=False)
    files = sorted(p.name for p in direct.out.iterdir())
    assert files == sorted(p.name for p in buffered.out.iterdir()) and len(files) > 3
    for name in files:
        assert (direct.out / name).read_bytes() == (buffered.out / name).read_bytes(), name


@pytest.mark.parametrize("header_pad", [0, 5])
@pytest.mark.parametrize("direct", [True, False])
def test_tensors_at_odd_offsets_merge_correctly(tmp_path: Path, header_pad: int, direct: bool) -> None:
    """A 3-byte U8 tensor ahead of the adapted F32 weight (and an unpadded header) puts it at an
    offset that is not a multiple of 4; safetensors loads such files, and so must a merge."""
    gen = torch.Generator().manual_seed(5)
    mask, W = torch.ones(3, dtype=torch.uint8), torch.randn(8, 6, generator=gen)
    header = {
        "tok.mask": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "layer.q.weight": {"dtype": "F32", "shape": [8, 6], "data_offsets": [3, 195]},
    }
    blob = json.dumps(header).encode() + b" " * header_pad
    (tmp_path / "base.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + mask.numpy().tobytes() + W.numpy().tobytes())
    A, B = torch.randn(2, 6, generator=gen), torch.randn(8, 2, generator=gen)
    adapter = loratools.Adapter(
        {"layer.q": loratools.LoraModule(A, B, 4.0)}, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
    )
    out = merge(tmp_path / "base.safetensors", [adapter], out=tmp_path / "out.safetensors", direct=direct).out
    merged = load_file(out)
    assert torch.equal(merged["tok.mask"], mask)
    assert torch.allclose(merged["layer.q.weight"], W + 2.0 * (B @ A), atol=1e-6)
