"""Hostile files through the real CLI: every run ends with a documented exit code, never a crash.

Hypothesis (seeded, bounded) builds adapters whose safetensors headers, configs, kohya and
diffusers tensors or base indexes are broken in the ways real files and attackers break them,
then runs a command on them with click's CliRunner (and a few as subprocesses).  Every run must
exit 0, 1, 2 or 3 (never 70, the internal-error code), print no traceback, and leave no output
file behind when it fails.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratools.cli import main

from .io.test_tensorfile_strict import headers

Q = "model.layers.0.q_proj"
PEFT_Q = "base_model.model." + Q
KOHYA_Q = "lora_unet_blocks_0_to_q"
DIFF_Q = "unet.blocks.0.to_q"
ALLOWED = {0, 1, 2, 3}
VALID_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}

HOSTILE_VALUES = st.sampled_from(
    [math.inf, -math.inf, math.nan, 10**400, 2**64, 1e308, -1, 0, 0.5, 2, 4, "4", True, None, [], {}, [4], ["q_proj"]]
    + ["\ud800", "x\udc00", "(?i)q_proj", "q_proj(?i)", "(" * 300, "q_proj", "all-linear", {"q_proj": math.inf}]
    + [{"(?i)q": 2}, {"q_proj": 10**400}, {"q_proj": "2"}, {"q_proj": 2}, {"\ud800": 1}]
)
CONFIG_FIELDS = st.sampled_from(
    ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias", "modules_to_save"]
    + ["fan_in_fan_out", "lora_bias", "peft_type", "base_model_name_or_path", "task_type", "extra"]
)
BROKEN_TEXT = st.sampled_from(
    [b"[" * 100_000, b"\xef\xbb\xbf{}", b'{"r": ' + b"1" * 5000 + b"}", b"\xff\xfe{\x00}\x00", b"{", b"", b"[]", b"null", b"\xe9"]
)
SHAPES = st.sampled_from([(2, 4), (4, 2), (2,), (), (0, 4), (2, 4, 1, 1), (3, 4), (1, 2, 4)])
ALPHAS = st.sampled_from([None, 1.0, 0.0, -2.0, math.inf, -math.inf, math.nan, 1e38, [1.0, 2.0], [], [[2.0]]])


def _tensor(shape, *, fill: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, fill, dtype=dtype)


@st.composite
def configs(draw) -> bytes:
    """An adapter_config.json: the valid one with up to three fields made hostile, or broken JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(BROKEN_TEXT)
    config: dict = dict(VALID_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(CONFIG_FIELDS)
        if draw(st.integers(0, 5)) == 0:
            config.pop(field, None)
        else:
            config[field] = draw(HOSTILE_VALUES)
    return json.dumps(config).encode()


@st.composite
def peft_tensors(draw) -> dict[str, torch.Tensor]:
    a_shape, b_shape = draw(st.sampled_from([((2, 4), (4, 2))] * 4 + [None])) or (draw(SHAPES), draw(SHAPES))
    tensors = {f"{PEFT_Q}.lora_A.weight": _tensor(a_shape), f"{PEFT_Q}.lora_B.weight": _tensor(b_shape)}
    change = draw(st.sampled_from(["none"] * 4 + ["newline", "inf", "int", "f64", "extra", "magnitude", "bias", "drop B"]))
    if change == "newline":
        tensors[f"{PEFT_Q}.lora_A.weight\n"] = tensors.pop(f"{PEFT_Q}.lora_A.weight")
    elif change == "inf":
        tensors[f"{PEFT_Q}.lora_B.weight"] = tensors[f"{PEFT_Q}.lora_B.weight"] * math.inf
    elif change in ("int", "f64"):
        tensors[f"{PEFT_Q}.lora_A.weight"] = tensors[f"{PEFT_Q}.lora_A.weight"].to(torch.int64 if change == "int" else torch.float64)
    elif change == "extra":
        tensors["base_model.model.lm_head.weight"] = _tensor((4, 4))
    elif change == "magnitude":
        tensors[f"{PEFT_Q}.lora_magnitude_vector"] = _tensor(draw(SHAPES))
    elif change == "bias":
        tensors[f"{PEFT_Q}.lora_B.bias"] = _tensor(draw(SHAPES))
    else:
        tensors.pop(f"{PEFT_Q}.lora_B.weight") if change == "drop B" else None
    return tensors


def _alpha_tensor(alpha) -> torch.Tensor:
    return torch.tensor(alpha, dtype=torch.float32)


@st.composite
def kohya_tensors(draw) -> dict[str, torch.Tensor]:
    down, up = draw(st.sampled_from([((2, 4), (4, 2))] * 3 + [None])) or (draw(SHAPES), draw(SHAPES))
    tensors = {f"{KOHYA_Q}.lora_down.weight": _tensor(down), f"{KOHYA_Q}.lora_up.weight": _tensor(up)}
    alpha = draw(ALPHAS)
    if alpha is not None:
        tensors[f"{KOHYA_Q}.alpha"] = _alpha_tensor(alpha)
    extra = draw(st.sampled_from([None, None, "dora", "junk", "newline", "lone up"]))
    if extra == "dora":
        tensors[f"{KOHYA_Q}.dora_scale"] = _tensor(draw(SHAPES))
    elif extra == "junk":
        tensors["lora_unet_x.hada_w1_a"] = _tensor((2, 2))
    elif extra == "newline":
        tensors[f"{KOHYA_Q}.lora_down.weight\n"] = tensors.pop(f"{KOHYA_Q}.lora_down.weight")
    elif extra == "lone up":
        tensors["lora_unet_other.lora_up.weight"] = _tensor((4, 2))
    return tensors


@st.composite
def diffusers_file(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    layout = draw(st.sampled_from(["peft", "lora", "processor"]))
    down, up = draw(st.sampled_from([((2, 4), (4, 2))] * 3 + [None])) or (draw(SHAPES), draw(SHAPES))
    if layout == "peft":
        keys = (f"{DIFF_Q}.lora_A.weight", f"{DIFF_Q}.lora_B.weight")
    elif layout == "lora":
        keys = (f"{DIFF_Q}.lora.down.weight", f"{DIFF_Q}.lora.up.weight")
    else:
        keys = ("blocks.0.processor.to_q_lora.down.weight", "blocks.0.processor.to_q_lora.up.weight")
    tensors = {keys[0]: _tensor(down), keys[1]: _tensor(up)}
    alpha = draw(ALPHAS)
    if alpha is not None and layout != "processor":
        tensors[f"{DIFF_Q}.alpha"] = _alpha_tensor(alpha)
    metadata = {}
    if draw(st.booleans()):
        value = draw(HOSTILE_VALUES)
        text = json.dumps({"unet.lora_alpha": value, "unet.r": 2, f"unet.{draw(CONFIG_FIELDS)}": value})
        metadata["lora_adapter_metadata"] = draw(st.sampled_from([text, text, "[" * 100_000, "{", "[]", '"x"']))
    return tensors, metadata


INDEXES = st.sampled_from(
    [b'{"weight_map": {"model.layers.0.q_proj.weight": "model-1.safetensors"}}'] * 3
    + [b"[]", b'{"weight_map": null}', b'{"weight_map": {"a": 5}}', b'{"weight_map": {"a": ".."}}', b'{"weight_map": {"a": ""}}']
    + [b'{"weight_map": {"a": "missing.safetensors"}}', b'{"weight_map": {"a": "a\\u0000b"}}', b"\xff\xfe", b"[" * 100_000]
    + [b'{"weight_map": {"a": "/etc/passwd"}}', b'{"weight_map": {}}', b'{"weight_map": {"a": "model-1.safetensors"}, "x": NaN}']
)


@st.composite
def cases(draw) -> dict:
    """One hostile input: which files to write, and the command to run on them."""
    kind = draw(st.sampled_from(["header", "config", "peft", "kohya", "diffusers", "index"]))
    case: dict = {"kind": kind, "config": json.dumps(VALID_CONFIG).encode(), "index": None, "metadata": {"format": "pt"}}
    case["tensors"] = {f"{PEFT_Q}.lora_A.weight": _tensor((2, 4)), f"{PEFT_Q}.lora_B.weight": _tensor((4, 2))}
    if kind == "header":
        case["raw"] = draw(headers())
    elif kind == "config":
        case["config"] = draw(configs())
    elif kind == "peft":
        case["tensors"] = draw(peft_tensors())
    elif kind == "kohya":
        case["tensors"], case["config"] = draw(kohya_tensors()), None
    elif kind == "diffusers":
        (case["tensors"], case["metadata"]), case["config"] = draw(diffusers_file()), None
    else:
        case["index"] = draw(INDEXES)
    commands = ["validate", "validate --json", "inspect", "convert peft", "convert kohya", "merge", "validate --base", "scale"]
    case["command"] = draw(st.sampled_from(commands if kind != "index" else ["merge", "validate --base", "merge", "convert peft"]))
    return case


def _write_case(root: Path, case: dict) -> tuple[Path, Path]:
    """The adapter (a directory, or one file for kohya/diffusers) and the base directory."""
    base = root / "base"
    base.mkdir()
    base_tensors = {f"{Q}.weight": torch.eye(4), "lm_head.weight": torch.ones(4, 4)}
    if case["index"] is None:
        save_file(base_tensors, base / "model.safetensors")
    else:
        save_file(base_tensors, base / "model-1.safetensors")
        (base / "model.safetensors.index.json").write_bytes(case["index"])
    if case["config"] is None:
        adapter = root / "lora.safetensors"
        save_file(case["tensors"], adapter, metadata=case["metadata"])
        return adapter, base
    adapter = root / "adapter"
    adapter.mkdir()
    weights = adapter / "adapter_model.safetensors"
    if "raw" in case:
        blob, data = case["raw"]
        weights.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    else:
        save_file(case["tensors"], weights, metadata=case["metadata"])
    (adapter / "adapter_config.json").write_bytes(case["config"])
    return adapter, base


def _argv(command: str, adapter: Path, base: Path, out: Path) -> list[str]:
    name, *rest = command.split()
    if name == "convert":
        return ["convert", str(adapter), "--to", rest[0], "-o", str(out)]
    if name == "merge":
        return ["merge", str(base), str(adapter), "-o", str(out), "--quiet"]
    if name == "scale":
        return ["scale", str(adapter), "0.5", "-o", str(out)]
    if rest == ["--base"]:
        return ["validate", str(adapter), "--base", str(base)]
    return [name, str(adapter), *rest]


def _check_run(root: Path, before: set[str], out: Path, code: int, output: str) -> None:
    assert code in ALLOWED, output
    assert "Traceback" not in output and "internal error" not in output, output
    left = set(os.listdir(root)) - before
    assert left <= ({out.name} if code == 0 else set()), (code, sorted(left), output)


@seed(1201)
@settings(
    max_examples=240,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_hostile_inputs_end_with_a_documented_exit_code(tmp_path_factory, case):
    root = tmp_path_factory.mktemp("case")
    adapter, base = _write_case(root, case)
    out = root / ("out.safetensors" if case["command"] == "convert kohya" else "out")
    before = set(os.listdir(root))
    result = CliRunner().invoke(main, _argv(case["command"], adapter, base, out))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check_run(root, before, out, result.exit_code, result.output + result.stderr)
    event(f"{case['kind']}: exit {result.exit_code}")


SUBPROCESS_CASES = {
    "nested header": {"kind": "header", "raw": (b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""), "command": "inspect"},
    "infinite alpha": {"kind": "config", "config": b'{"peft_type":"LORA","r":2,"lora_alpha":Infinity,"target_modules":["q_proj"]}'},
    "kohya alpha list": {"kind": "kohya", "config": None, "tensors": "kohya", "command": "merge"},
    "index with int shard": {"kind": "index", "index": b'{"weight_map": {"a": 5}}', "command": "validate --base"},
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_hostile_inputs_as_a_subprocess(tmp_path, name):
    case = {"config": json.dumps(VALID_CONFIG).encode(), "index": None, "metadata": {"format": "pt"}, "command": "validate"}
    case["tensors"] = {f"{PEFT_Q}.lora_A.weight": _tensor((2, 4)), f"{PEFT_Q}.lora_B.weight": _tensor((4, 2))}
    case.update(SUBPROCESS_CASES[name])
    if case["tensors"] == "kohya":
        case["tensors"] = {
            f"{KOHYA_Q}.lora_down.weight": _tensor((2, 4)),
            f"{KOHYA_Q}.lora_up.weight": _tensor((4, 2)),
            f"{KOHYA_Q}.alpha": torch.tensor([1.0, 2.0]),
        }
    adapter, base = _write_case(tmp_path, case)
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    argv = _argv(case["command"], adapter, base, out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "loratools", *argv], capture_output=True, text=True, timeout=120, env=env)
    _check_run(tmp_path, before, out, proc.returncode, proc.stdout + proc.stderr)
    assert proc.returncode in (1, 3) and len(proc.stderr.strip().splitlines()) <= 1, proc.stderr


@pytest.mark.parametrize("where", ["config", "kohya"])
def test_infinite_alpha_is_refused_by_validate_and_merge(tmp_path, where):
    case = {"kind": where, "index": None, "metadata": {"format": "pt"}}
    case["config"] = b'{"peft_type":"LORA","r":2,"lora_alpha":Infinity,"target_modules":["q_proj"]}' if where == "config" else None
    case["tensors"] = {f"{PEFT_Q}.lora_A.weight": _tensor((2, 4)), f"{PEFT_Q}.lora_B.weight": _tensor((4, 2))}
    if where == "kohya":
        case["tensors"] = {
            f"{KOHYA_Q}.lora_down.weight": _tensor((2, 4)),
            f"{KOHYA_Q}.lora_up.weight": _tensor((4, 2)),
            f"{KOHYA_Q}.alpha": torch.tensor(math.inf),
        }
    adapter, base = _write_case(tmp_path, case)
    runner = CliRunner()
    report = json.loads(runner.invoke(main, ["validate", str(adapter), "--json"]).output)
    assert not report["valid"] and report["problems"][0]["code"] == ("config-schema" if where == "config" else "bad-alpha")
    result = runner.invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 3 and "inf" in result.stderr and not (tmp_path / "out").exists()


def test_key_ending_in_newline_is_no_lora_a(tmp_path):
    case = {"kind": "peft", "index": None, "metadata": {"format": "pt"}, "config": json.dumps(VALID_CONFIG).encode()}
    case["tensors"] = {f"{PEFT_Q}.lora_A.weight\n": _tensor((2, 4)), f"{PEFT_Q}.lora_B.weight": _tensor((4, 2))}
    adapter, _ = _write_case(tmp_path, case)
    report = json.loads(CliRunner().invoke(main, ["validate", str(adapter), "--json"]).output)
    assert {p["code"] for p in report["problems"]} == {"unexpected-tensor", "lora-a-missing"}
