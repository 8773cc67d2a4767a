"""`loratools merge` / `loratools unmerge` through click's CliRunner, on synthetic checkpoints."""

from __future__ import annotations

import ast
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from loratools import Adapter, LoraModule, save
from loratools.cli import main
from loratools.io.checkpoint import INDEX_NAME as INDEX
from loratools.io.tensorfile import write_file

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A two-shard base with one 4x3 weight ``layer.q.weight`` = 1 and an adapter with ΔW = 2·B·A = 2."""
    base = tmp_path / "base"
    base.mkdir()
    write_file(base / "model-00001-of-00002.safetensors", {"layer.q.weight": torch.ones(4, 3)}, {"format": "pt"})
    write_file(base / "model-00002-of-00002.safetensors", {"layer.norm.weight": torch.ones(3, dtype=torch.bfloat16)}, {"format": "pt"})
    index = {
        "metadata": {"total_size": 54},
        "weight_map": {"layer.q.weight": "model-00001-of-00002.safetensors", "layer.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text("{}")
    module = LoraModule(torch.full((2, 3), 0.5), torch.ones(4, 2), alpha=4.0)  # s = 2, B·A = 1 everywhere
    save(Adapter({"layer.q": module}, dict(CONFIG)), tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_merge_writes_merged_checkpoint_and_reports_json(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    code, stdout, _ = _run("merge", str(base), str(adapter), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["out"] == str(tmp_path / "base-merged") and report["merged"] == 1 and report["shards"] == 2
    merged = load_file(tmp_path / "base-merged" / "model-00001-of-00002.safetensors")["layer.q.weight"]
    assert torch.equal(merged, torch.full((4, 3), 3.0))
    assert (tmp_path / "base-merged" / "config.json").exists()


def test_weights_dtype_and_human_summary(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    code, stdout, _ = _run(
        "merge", str(base), str(adapter), str(adapter), "-w", "0.5", "-w", "0.25", "--dtype", "fp16", "-o", str(tmp_path / "o")
    )
    assert code == 0 and "merged 1 of 2 tensors" in stdout
    tensors = load_file(tmp_path / "o" / "model-00001-of-00002.safetensors")
    assert tensors["layer.q.weight"].dtype == torch.float16
    assert torch.equal(tensors["layer.q.weight"], torch.full((4, 3), 2.5, dtype=torch.float16))  # 1 + 0.5·2 + 0.25·2


def test_existing_output_needs_force(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    (tmp_path / "o").mkdir()
    code, _, stderr = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--quiet")
    assert code == 3 and "already exists" in stderr and "--force" in stderr
    assert _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--quiet", "--force")[:2] == (0, "")


def test_output_inside_base_and_mismatches_are_one_line_errors(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    code, _, stderr = _run("merge", str(base), str(adapter), "-o", str(base / "inner"))
    assert code == 3 and "inside it" in stderr and len(stderr.strip().splitlines()) == 1
    save(
        Adapter(
            {
                "layer.q": LoraModule(torch.ones(2, 5), torch.ones(4, 2), 4.0),
                "layer.k": LoraModule(torch.ones(2, 3), torch.ones(4, 2), 4.0),
            },
            {**CONFIG, "target_modules": ["q", "k"]},
        ),
        tmp_path / "bad",
    )
    code, _, stderr = _run("merge", str(base), str(tmp_path / "bad"), "-o", str(tmp_path / "o"))
    assert code == 3 and "layer.q" in stderr and "layer.k" in stderr and "[4, 5]" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unmerge_restores_the_base(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    assert _run("merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--quiet")[0] == 0
    code, stdout, _ = _run("unmerge", str(tmp_path / "m"), str(adapter), "-o", str(tmp_path / "back"))
    assert code == 0 and "unmerged 1 of 2 tensors" in stdout
    back = load_file(tmp_path / "back" / "model-00001-of-00002.safetensors")["layer.q.weight"]
    assert torch.equal(back, torch.ones(4, 3))
    assert _run("unmerge", str(tmp_path / "m"), str(adapter))[0] == 2  # -o is required


def test_help_shows_examples() -> None:
    code, stdout, _ = _run("merge", "--help")
    assert code == 0 and "loratools merge ./base ./a ./b -w 0.7 -w 0.3" in stdout and "--device" in stdout


def test_bad_weights_and_devices_are_usage_errors(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = files
    for args in (["-w", "nan"], ["-w", "1", "-w", "2"]):
        code, _, stderr = _run("merge", str(base), str(adapter), *args, "-o", str(tmp_path / "o"))
        assert code == 2 and "weight" in stderr and "Traceback" not in stderr
    if not torch.cuda.is_available():
        code, _, stderr = _run("merge", str(base), str(adapter), "--device", "cuda", "-o", str(tmp_path / "o"))
        assert code == 2 and "CUDA is not available" in stderr
    assert not (tmp_path / "o").exists()


def test_base_given_as_dot(files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = files
    monkeypatch.chdir(base)
    code, _, _ = _run("merge", ".", str(adapter), "--quiet")
    assert code == 0 and (tmp_path / "base-merged" / "config.json").exists()


# --- real processes and file systems ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _limited() -> None:
    """preexec for CLI runs that could run away: files of at most 64 MiB (a regression copying /dev/zero fails)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "loratools", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_limited
    )


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".loratools-tmp-")]


@pytest.mark.slow  # two fresh interpreters importing torch
def test_two_concurrent_merges_into_one_output_at_most_one_succeeds(files: tuple[Path, Path], tmp_path: Path) -> None:
    """Two real `loratools merge` processes, no --force, one -o: the winner's output (told apart by
    its dtype) is in place, the other exits 3 with one line, and nothing is left beside it."""
    base, adapter = files
    out = tmp_path / "out"
    procs = {dtype: _cli("merge", str(base), str(adapter), "-o", str(out), "--quiet", "--dtype", dtype) for dtype in ("fp16", "fp32")}
    results = {dtype: (proc.wait(timeout=300), proc.stderr.read()) for dtype, proc in procs.items()}  # type: ignore[union-attr]
    winners = [dtype for dtype, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    code, stderr = results[loser]
    assert code == 3 and "output already exists" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    merged = load_file(out / "model-00001-of-00002.safetensors")["layer.q.weight"]
    assert merged.dtype == {"fp16": torch.float16, "fp32": torch.float32}[winners[0]]
    assert _leftovers(tmp_path) == []


def test_side_file_linked_to_dev_zero_is_refused_in_one_line(files: tuple[Path, Path], tmp_path: Path, guarded) -> None:
    """In a bounded child (conftest ``guarded``): copied, /dev/zero would fill the disk."""
    base, adapter = files
    (base / "tokenizer.model").symlink_to("/dev/zero")
    got = guarded(lambda: _run("merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--quiet"), seconds=60)
    assert got.startswith("ok: "), got
    code, stdout, stderr = ast.literal_eval(got[len("ok: ") :])
    assert code == 3 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert f"{base / 'tokenizer.model'}: is a symlink to /dev/zero, outside the base" in stderr
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


FULL_DISK = """
mount -t tmpfs -o size=1m loratools-test "$1" || exit 99
"$2" -m loratools merge "$3" "$4" -o "$1/out" --quiet
echo "exit=$?"
ls -A "$1"
"""


@pytest.mark.slow  # a fresh interpreter importing torch
@pytest.mark.parametrize("where", ["side files", "shards"])
def test_a_disk_that_fills_is_one_line_naming_the_file(files: tuple[Path, Path], tmp_path: Path, where: str) -> None:
    """A real ENOSPC: a 1 MiB tmpfs (in a private mount namespace) and 400 tiny side files or shards,
    which pass the free-space estimate (bytes) but take a 4 KiB page each; the sink's and the side
    files' "No space left on device" name no file (or list every file) on their own."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    base, adapter = files
    if where == "side files":
        (base / "extra").mkdir()
        for i in range(400):
            (base / "extra" / f"f{i:03}.txt").write_text("x")
    else:
        index = json.loads((base / INDEX).read_text())
        for i in range(400):
            write_file(base / f"n{i:03}.safetensors", {f"n{i}.weight": torch.ones(1)})
            index["weight_map"][f"n{i}.weight"] = f"n{i:03}.safetensors"
        (base / INDEX).write_text(json.dumps(index))
    mount = tmp_path / "small"
    mount.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", str(mount), sys.executable, str(base), str(adapter)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 99 or "exit=" not in proc.stdout:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.stdout.split() == ["exit=3"], proc.stdout  # and nothing left on that disk
    (line,) = proc.stderr.strip().splitlines()
    named = f"{mount}/out/extra/f" if where == "side files" else f"{mount}/out/n"
    assert named in line and "no space left on the device while writing it; nothing was written" in line, line


def _fp8_base(tmp_path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An FP8 base: ``layer.q.weight`` = 4 in e4m3 with one 4x3 block scale 0.25, so W = 1 everywhere."""
    base = tmp_path / "fp8"
    base.mkdir()
    tensors = {"layer.q.weight": torch.full((4, 3), 4.0).to(torch.float8_e4m3fn), "layer.q.weight_scale_inv": torch.full((1, 1), 0.25)}
    write_file(base / "model.safetensors", {**tensors, **(extra or {})}, {"format": "pt"})
    (base / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}))
    return base


def test_merge_into_fp8_base_requantizes_and_reports_survival(files: tuple[Path, Path], tmp_path: Path) -> None:
    """W' = 1 + 2 = 3: amax 3, scale 448/3, so every entry stores e4m3 448 and scale_inv 3/448; ΔW survives whole."""
    _, adapter = files
    base = _fp8_base(tmp_path)
    code, stdout, _ = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["quantization"] == {
        "method": "fp8",
        "codecs": {"fp8-block": 1},
        "labels": {"fp8-block": "FP8 e4m3, one per-tensor scale (F32 weight_scale_inv)"},  # one 128x128 block holds it all
        "unhandled": {},
        "written": "kept",
    }
    assert report["survival"]["total"] == pytest.approx(1.0, abs=1e-6)
    out = load_file(tmp_path / "o" / "model.safetensors")
    assert out["layer.q.weight"].float().unique().tolist() == [448.0]
    assert out["layer.q.weight_scale_inv"].item() == pytest.approx(3 / 448)
    code, stdout, _ = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o2"))
    assert code == 0 and "ΔW surviving requantization: 100.0% in total over 1 tensors" in stdout
    code, stdout, _ = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o3"), "--dtype", "bf16")
    assert code == 0 and "written dequantized" in stdout
    assert load_file(tmp_path / "o3" / "model.safetensors")["layer.q.weight"].tolist() == [[3.0] * 3] * 4


def test_merge_refuses_unreadable_quantized_tensors_in_one_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter = files
    base = _fp8_base(tmp_path, {"layer.k.qweight": torch.zeros(1, 3, dtype=torch.int32)})
    code, _, stderr = _run("merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--dtype", "bf16")
    assert code != 0 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "layer.k.weight: has qweight" in stderr and "cannot dequantize" in stderr
    assert not (tmp_path / "o").exists()
