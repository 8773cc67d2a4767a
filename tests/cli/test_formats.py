"""`loratools convert`: --to gguf with a base, and --for refusing what a runtime cannot apply."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import loratools
from loratools.cli import main

from ..conftest import peft_adapter


@pytest.fixture()
def runner():
    return CliRunner()


def test_convert_to_gguf(runner, tmp_path, peft_dir, llama_base):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "a.gguf"
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "gguf", "--base", str(llama_base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert {t.name for t in gguf.GGUFReader(out).tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "gguf", "-o", str(tmp_path / "b.gguf")])
    assert result.exit_code == 2 and "--base" in result.output


def test_convert_for_refuses_dora_for_vllm(runner, tmp_path):
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    result = runner.invoke(main, ["convert", str(dora), "--to", "peft", "--for", "vllm", "-o", str(tmp_path / "out")])
    assert result.exit_code == 3 and "vllm refuses DoRA" in result.output and not (tmp_path / "out").exists()


def test_convert_to_mlx_and_back_merges_bit_for_bit(runner, tmp_path, peft_dir, llama_base):
    """A PEFT-written adapter through mlx-lm's layout and back merges into the tiny Llama exactly as the original."""
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "mlx", "-o", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    result = runner.invoke(main, ["convert", str(tmp_path / "mlx"), "--to", "peft", "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    merged = []
    for name in ("orig", "back"):
        out = tmp_path / f"merged-{name}"
        loratools.merge(llama_base, [peft_dir if name == "orig" else tmp_path / "back"], out=out)
        tensors = {}
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        merged.append(tensors)
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def _kron_lokr(path):
    """A full-full LoKr module for an 8 x 12 linear: ΔW = kron(w1, w2), σ(w1) = (2, 1), σ(w2) = (3, 1, 0.5, 0.25).

    σ(ΔW) = the products: 6, 3, 2, 1, 1, 0.5, 0.5, 0.25; ‖ΔW‖_F² = 51.5625.
    """
    from safetensors.torch import save_file

    w1 = torch.tensor([[2.0, 0, 0], [0, 1, 0]])
    w2 = torch.diag(torch.tensor([3.0, 1, 0.5, 0.25]))
    name = "lora_unet_proj_in"
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2}, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return name, torch.kron(w1, w2)


@pytest.mark.parametrize(
    ("flag", "value", "rank", "energy", "error"),
    [
        ("--rank", "2", 2, 45 / 51.5625, (6.5625 / 51.5625) ** 0.5),  # keeps 6 and 3
        ("--max-rel-error", "0.1", 6, 51.25 / 51.5625, (0.3125 / 51.5625) ** 0.5),  # k=5 leaves 0.5625 > 0.01·51.5625
        ("--energy", "1", 8, 1.0, 0.0),
    ],
)
def test_convert_lokr_truncates_with_a_per_module_report(runner, tmp_path, flag, value, rank, energy, error):
    name, dense = _kron_lokr(tmp_path / "lokr.safetensors")
    out = tmp_path / "lora.safetensors"
    args = ["convert", str(tmp_path / "lokr.safetensors"), "--to", "kohya", flag, value, "--json", "-o", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["report"][0]
    assert (row["module"], row["old_rank"], row["new_rank"]) == (name, 8, rank)
    assert row["kept_energy"] == pytest.approx(energy, abs=1e-6) and row["rel_error"] == pytest.approx(error, abs=1e-6)
    written = loratools.load(out).modules[name]
    assert written.rank == rank
    measured = float((written.delta().double() - dense.double()).norm() / dense.double().norm())
    assert measured == pytest.approx(error, abs=1e-6)


def test_convert_without_truncation_flags_stays_exact(runner, tmp_path):
    name, dense = _kron_lokr(tmp_path / "lokr.safetensors")
    out = tmp_path / "lora.safetensors"
    result = runner.invoke(main, ["convert", str(tmp_path / "lokr.safetensors"), "--to", "kohya", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "report" not in json.loads(result.stdout) and json.loads(result.stdout)["ranks"] == [8]
    assert torch.allclose(loratools.load(out).modules[name].delta(), dense, atol=1e-6)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # the LoKr was written as a plain LoRA of rank 8: the network description says so
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"]), meta["ss_network_dim"]) == (
        "lycoris.kohya",
        {"algo": "lora"},
        "8",
    )


def test_convert_plain_lora_text_report_and_one_criterion(runner, tmp_path, peft_dir):
    result = runner.invoke(main, ["convert", str(peft_dir), "--to", "peft", "--rank", "2", "-o", str(tmp_path / "r2")])
    assert result.exit_code == 0, result.output
    assert "truncated SVD" in result.output and "rel. error" in result.output
    assert {m.rank for m in loratools.load(tmp_path / "r2").modules.values()} == {2}
    both = ["convert", str(peft_dir), "--to", "peft", "--rank", "2", "--energy", "0.9", "-o", str(tmp_path / "x")]
    result = runner.invoke(main, both)
    assert result.exit_code == 2 and "exactly one" in result.output and not (tmp_path / "x").exists()
