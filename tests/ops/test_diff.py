"""diff: cosine and norm ratio of ΔW from the factors agree with the dense computation."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import loratools
from loratools import Adapter, LoraModule
from loratools.cli import main


def _dense_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def test_hand_checked_numbers():
    # ΔW_A = [[1, 0], [0, 0]], ΔW_B = 2·[[1, 1], [0, 0]]: cos = 1/sqrt(2), ‖A‖/‖B‖ = 1/(2·sqrt(2))
    a = Adapter({"m": LoraModule(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]), 1.0)})
    b = Adapter({"m": LoraModule(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]]), 2.0)})
    (row,) = loratools.diff(a, b).modules
    assert abs(row.cosine - 2**-0.5) < 1e-12
    assert abs(row.norm_ratio - 1 / (2 * 2**0.5)) < 1e-12


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(1, 9),
    inp=st.integers(1, 9),
    r1=st.integers(1, 4),
    r2=st.integers(1, 4),
    alpha1=st.floats(0.1, 16),
    alpha2=st.floats(0.1, 16),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_dense(out, inp, r1, r2, alpha1, alpha2, conv, seed):
    g = torch.Generator().manual_seed(seed)
    k = (inp, 3, 3) if conv else (inp,)

    def module(r, alpha):
        B = torch.randn(out, r, *((1, 1) if conv else ()), generator=g)
        return LoraModule(torch.randn(r, *k, generator=g), B, alpha, kind="conv" if conv else "linear")

    ma, mb = module(r1, alpha1), module(r2, alpha2)
    (row,) = loratools.diff(Adapter({"m": ma}), Adapter({"m": mb})).modules
    da, db = ma.delta(), mb.delta()
    assert abs(row.cosine - _dense_cosine(da, db)) < 1e-5
    assert abs(row.norm_ratio - float(da.double().norm() / db.double().norm())) < 1e-4 * row.norm_ratio
    (back,) = loratools.diff(Adapter({"m": mb}), Adapter({"m": ma})).modules
    assert abs(back.cosine - row.cosine) < 1e-12  # symmetric


def test_one_sided_and_mismatched_modules():
    one = LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0)
    other = LoraModule(torch.ones(1, 4), torch.ones(2, 1), 1.0)
    zero = LoraModule(torch.zeros(1, 3), torch.ones(2, 1), 1.0)
    report = loratools.diff(Adapter({"x": one, "a": one, "z": one}), Adapter({"x": other, "b": one, "z": zero}))
    assert report.only_a == ["a"] and report.only_b == ["b"]
    assert "[2, 3]" in report.mismatched["x"] and "[2, 4]" in report.mismatched["x"]
    (row,) = report.modules
    assert row.module == "z" and row.cosine is None and row.norm_ratio is None


def test_cli_diff_json_on_files(tmp_path):
    a = Adapter({"m": LoraModule(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]), 1.0)})
    loratools.save(a, tmp_path / "a")
    loratools.save_kohya(a, tmp_path / "a.safetensors")  # kohya on one side: same module name, read back through load
    result = CliRunner().invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "a.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["only_a"] == ["m"] and data["only_b"] == ["lora_unet_m"]
    text = CliRunner().invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "a")])
    assert text.exit_code == 0 and "1" in text.output
