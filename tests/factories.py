"""Builders every test shares: small random adapters and the dense reference they must match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraModule


def random_module(
    out: int = 6,
    inp: int = 5,
    rank: int = 3,
    *,
    alpha: float = 8.0,
    rslora: bool = False,
    kind: str = "linear",
    kernel: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoraModule:
    """A module with random (non-zero) A and B; conv when ``kernel`` is given (A: r x in x kernel)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, inp, *kernel, generator=g).to(dtype)
    B = torch.randn(out, rank, *((1,) * len(kernel)), generator=g).to(dtype)
    return LoraModule(A, B, alpha, rslora, "conv" if kernel else kind)  # type: ignore[arg-type]


def make_adapter(modules: dict[str, LoraModule], **config) -> Adapter:
    """An in-memory adapter holding ``modules``; its config is refit from the modules on save."""
    first = next(iter(modules.values()))
    base = {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "target_modules": sorted(modules)}
    return Adapter(modules, {**base, **config})


def random_adapter(
    n: int = 2, *, out: int = 6, inp: int = 5, rank: int = 3, alpha: float = 6.0, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Adapter:
    """``n`` random q_proj modules (layers 0..n-1) with one rank and alpha."""
    modules = {
        f"model.layers.{i}.self_attn.q_proj": random_module(out, inp, rank, alpha=alpha, dtype=dtype, seed=seed + i) for i in range(n)
    }
    return Adapter(modules, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]})


def dense(m: LoraModule) -> torch.Tensor:
    """s·B·A in float64 as a matrix (out, in·k...), the reference every factored result must match."""
    B = m.B.reshape(m.B.shape[0], m.B.shape[1]).double()
    A = m.A.reshape(m.A.shape[0], -1).double()
    return m.scale * (B @ A)


GiB = 1024**3
_REPO = Path(__file__).resolve().parents[1]


def in_subprocess(code: str, *, timeout: float = 300) -> tuple[dict, int]:
    """Run ``code`` in a fresh Python; it must set ``result`` (JSON-able).  Returns ``(result, peak RSS bytes)``.

    The child measures its own peak: on Linux its memory's high-water mark (``VmHWM``, which starts
    afresh at exec; ``ru_maxrss`` does not, so it would count the forked test process's pages and
    fail whenever pytest itself has grown past the bound), elsewhere ``resource.getrusage``.
    """
    tail = """
import json as _j, resource as _r
try:
    _hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    _hwm = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss
print(_j.dumps({'result': result, 'rss': _hwm * 1024}))"""
    env = {**os.environ, "PYTHONPATH": str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + tail], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["result"], answer["rss"]


def tiny_checkpoint(path: str | Path, keys: list[str]) -> Path:
    """A safetensors file of one F32 [1, 1] zero per key, written from a hand-built header (fast for 100k keys)."""
    header = {k: {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    blob = json.dumps(header).encode()
    path = Path(path)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(4 * len(keys)))
    return path
