"""The add/scale/subtract/resize commands and inspect --spectrum, through click's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from loratools import load
from loratools.cli import main

from ..conftest import peft_adapter
from ..factories import dense

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    a = peft_adapter(root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(root / "b", seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"])
    wide = peft_adapter(root / "wide", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    return a, b, wide


def run(*args: str):
    return CliRunner(env={"COLUMNS": "250"}).invoke(main, [str(a) for a in args])


def test_add_with_weights_writes_the_exact_sum(inputs, tmp_path):
    a, b, _ = inputs
    result = run("add", a, b, "-w", "0.5", "-w", "-2", "-o", tmp_path / "sum", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ranks"] == [2, 4, 6]
    out, la, lb = load(tmp_path / "sum"), load(a), load(b)
    want = 0.5 * dense(la.modules[Q]) - 2 * dense(lb.modules[Q])
    torch.testing.assert_close(dense(out.modules[Q]), want, rtol=1e-5, atol=1e-5)


def test_add_with_rank_compresses_and_reports(inputs, tmp_path):
    a, b, _ = inputs
    result = run("add", a, b, "--rank", "3", "-o", tmp_path / "sum3")
    assert result.exit_code == 0, result.output
    assert "resize" in result.stdout and Q in result.stdout
    assert {m.rank for m in load(tmp_path / "sum3").modules.values()} == {2, 3}


def test_add_with_a_method_reports_it_in_json_and_refuses_density_zero(inputs, tmp_path):
    a, b, _ = inputs
    result = run("add", a, b, "--method", "della", "--density", "0.5", "--seed", "4", "--rank", "2", "-o", tmp_path / "d", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == {"name": "della", "density": 0.5, "majority_sign": "total", "epsilon": 0.15, "seed": 4}
    assert len(report["report"]) == len(load(tmp_path / "d").modules)
    refused = run("add", a, b, "--method", "dare", "--density", "0", "--rank", "2", "-o", tmp_path / "z")
    assert refused.exit_code == 2 and "density must be in (0, 1]" in refused.output
    assert not (tmp_path / "z").exists()


def test_scale_takes_a_negative_factor(inputs, tmp_path):
    a, _, _ = inputs
    result = run("scale", a, "-0.5", "-o", tmp_path / "neg", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    out = load(tmp_path / "neg").modules[Q]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(dense(out), -0.5 * dense(load(a).modules[Q]), rtol=2e-2, atol=2e-2)


def test_subtract_an_adapter_from_itself_is_zero(inputs, tmp_path):
    a, _, _ = inputs
    assert run("subtract", a, a, "-o", tmp_path / "zero").exit_code == 0
    assert float(dense(load(tmp_path / "zero").modules[Q]).abs().max()) < 1e-6


def test_resize_prints_the_report_table_and_json(inputs, tmp_path):
    a, _, _ = inputs
    result = run("resize", a, "--rank", "2", "-o", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    assert "kept energy" in result.stdout and Q in result.stdout and "wrote" in result.stdout
    result = run("resize", a, "--energy", "0.9", "-o", tmp_path / "e90", "--json")
    report = json.loads(result.stdout)["report"]
    assert {r["module"] for r in report} == set(load(a).modules)
    assert all(r["old_rank"] == 4 and r["kept_energy"] >= 0.9 for r in report)


def test_outputs_refuse_to_overwrite_unless_forced(inputs, tmp_path):
    a, _, _ = inputs
    (tmp_path / "taken").mkdir()
    result = run("scale", a, "2", "-o", tmp_path / "taken")
    assert result.exit_code == 3 and "--force" in result.stderr
    assert list((tmp_path / "taken").iterdir()) == []
    assert run("scale", a, "2", "-o", tmp_path / "taken", "--force").exit_code == 0
    assert load(tmp_path / "taken").modules


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "0"], "rank must be an integer >= 1, got 0"),
        (["--rank", "-2"], "rank must be an integer >= 1"),
        (["--rank", "abc"], "'abc' is not a valid integer"),
        (["--energy", "x"], "'x' is not a valid float"),
        ([], "give exactly one of rank, energy, max_rel_error, sv_ratio (got none)"),
        (["--rank", "2", "--sv-ratio", "10"], "(got rank, sv_ratio)"),
    ],
)
def test_bad_resize_options_give_one_error_and_write_nothing(inputs, tmp_path, args, needle):
    a, _, _ = inputs
    result = run("resize", a, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_weight_count_mismatch_is_a_usage_error(inputs, tmp_path):
    a, b, _ = inputs
    result = run("add", a, b, "-w", "1", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "got 1 weight(s) for 2 adapter(s)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_incompatible_shapes_name_the_module(inputs, tmp_path):
    a, _, _ = inputs
    wide = load(inputs[2])
    # same module name, but a ΔW of a different shape: 16 x 32 instead of 16 x 16
    from loratools import Adapter, LoraModule, save

    m = wide.modules[Q]
    odd = save(Adapter({Q: LoraModule(torch.ones(2, 32), m.B, m.alpha)}, wide.config), tmp_path / "odd")
    result = run("add", a, odd, "-o", tmp_path / "out")
    assert result.exit_code == 3 and f"{Q}: input 1 has a linear ΔW of shape 16 x 16 but input 2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_add_needs_two_inputs(inputs, tmp_path):
    assert run("add", inputs[0], "-o", tmp_path / "out").exit_code == 2


def test_inspect_spectrum_table_json_and_plot(inputs, tmp_path):
    a, _, _ = inputs
    result = run("inspect", a, "--spectrum")
    assert result.exit_code == 0, result.output
    assert "rank @99.0%" in result.stdout and Q in result.stdout
    data = json.loads(run("inspect", a, "--spectrum", "--json").stdout)
    row = next(r for r in data["modules"] if r["module"] == Q)
    m = load(a).modules[Q]
    assert row["singular_values"] == pytest.approx(torch.linalg.svdvals(dense(m))[:4].tolist(), rel=1e-5)
    png = tmp_path / "spectrum.png"
    assert run("inspect", a, "--spectrum", "--plot", png).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run("inspect", a, "--plot", png).exit_code == 3
    assert run("inspect", a, "--plot", png, "--force").exit_code == 0


def test_plot_without_matplotlib_says_how_to_get_it(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = run("inspect", inputs[0], "--spectrum", "--plot", tmp_path / "s.png")
    assert result.exit_code == 3 and "pip install 'loratools[plot]'" in result.stderr
    assert not (tmp_path / "s.png").exists()


def test_kohya_inputs_stay_kohya_unless_to_says_otherwise(inputs, tmp_path):
    from safetensors import safe_open

    from loratools.api import save_kohya

    kohya = save_kohya(load(inputs[0]), tmp_path / "k.safetensors")
    assert run("resize", kohya, "--rank", "2", "-o", tmp_path / "k2.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "k2.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    unmapped = run("scale", kohya, "0.5", "--to", "peft", "-o", tmp_path / "peft")  # kohya names, no base to map them
    assert unmapped.exit_code == 3 and "--base" in unmapped.stderr and not (tmp_path / "peft").exists()
    wrong = run("resize", kohya, "--rank", "2", "-o", tmp_path / "kdir")
    assert wrong.exit_code == 2 and ".safetensors" in wrong.stderr and not (tmp_path / "kdir").exists()


def test_resize_to_kohya_writes_one_alpha(tmp_path):
    """The kohya output convention: one .alpha for every module, scales folded into lora_up."""
    src = peft_adapter(tmp_path / "src", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = tmp_path / "k.safetensors"
    result = CliRunner().invoke(main, ["resize", str(src), "--energy", "0.9", "--to", "kohya", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(out, "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith(".lora_down.weight")}
    assert len(alphas) == 1 and len(ranks) > 1
    assert CliRunner().invoke(main, ["validate", str(out), "--for", "all"]).exit_code == 0


def test_add_with_a_method_writes_the_compressed_result_and_its_report(inputs, tmp_path):
    from loratools.methods import MethodOptions, get_method

    a, b, _ = inputs
    result = run(
        "add",
        a,
        b,
        "--method",
        "ties",
        "--density",
        "0.5",
        "--majority-sign",
        "frequency",
        "--rank",
        "full",
        "-o",
        tmp_path / "t",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = {r["module"]: r for r in json.loads(result.stdout)["report"]}
    assert report[Q]["rel_error"] < 1e-6
    la, lb = load(a), load(b)
    want = get_method("ties").combine([dense(la.modules[Q]), dense(lb.modules[Q])], [1.0, 1.0], MethodOptions(0.5, "frequency"), None)
    torch.testing.assert_close(dense(load(tmp_path / "t").modules[Q]), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "ties", "--density", "0.5"), "give --rank"),
        (("--density", "0.5", "--rank", "2"), "task_arithmetic has no density"),
        (("--method", "ties", "--density", "2", "--rank", "2"), "density must be in"),
        (("--method", "ties", "--rank", "most"), "expected an integer or 'full'"),
    ],
)
def test_add_refuses_undefined_method_options_in_one_line(inputs, tmp_path, args, message):
    a, b, _ = inputs
    result = run("add", a, b, *args, "-o", tmp_path / "x")
    assert result.exit_code in (1, 2) and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
