"""Benchmark: `loratools resize --rank 8` on a 7B-shaped rank-64 adapter vs the dense SVD method.

Builds a Llama-7B-shaped PEFT adapter (32 layers x q,k,v,o,gate,up,down; hidden 4096, MLP 11008;
rank 64, fp16, about 320 MB) with ``loratools.save`` in a temporary directory, then measures in the
same run on the same machine:

* factored: ``loratools resize ADAPTER --rank 8 -o OUT`` as a whole process (interpreter start,
  imports, load with validation and checksum, the factored SVDs, save), pinned to ``--cores`` cores;
* dense: the classic method (form ΔW = s·B·A in float32, ``torch.linalg.svd``, keep 8) timed on one
  module of each shape class and scaled up to the 224 modules.

It also checks that the factored singular values match the dense SVD's to 1e-4 relative.
Goals: factored <= 5 s on 2 cores, >= 100x faster than dense.

    python benchmarks/resize.py [--cores 2] [--layers 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loratools import Adapter, LoraModule, load, save  # noqa: E402
from loratools.linalg import factored_svd  # noqa: E402

HIDDEN, MLP, RANK, ALPHA, NEW_RANK = 4096, 11008, 64, 128, 8
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
SAMPLE = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # one module per distinct shape


def build(layers: int, seed: int = 0) -> Adapter:
    """Random rank-64 fp16 factors at trained-LoRA-like magnitudes (A ~ 1/sqrt(in), B ~ 1e-2)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(layers):
        for name, (out, inp) in SHAPES.items():
            A = (torch.randn(RANK, inp, generator=g) / inp**0.5).half()
            B = (torch.randn(out, RANK, generator=g) * 1e-2).half()
            modules[f"model.layers.{i}.{name}"] = LoraModule(A, B, float(ALPHA))
    targets = sorted({n.split(".")[-1] for n in SHAPES})
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    }
    return Adapter(modules, config)


def time_cli(adapter_dir: Path, out_dir: Path, cores: int) -> float:
    """Wall time of the whole `loratools resize` process, best of two (the first also warms the page cache)."""
    code = "import sys; from loratools.cli import main; sys.argv[0] = 'loratools'; main()"
    cmd = [sys.executable, "-c", code, "resize", str(adapter_dir), "--rank", str(NEW_RANK), "-o", str(out_dir), "--force"]
    if shutil.which("taskset") and (os.cpu_count() or 1) > cores:
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(cores)), *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cores), "COLUMNS": "120"}
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def time_dense(adapter: Adapter, cores: int) -> tuple[float, float]:
    """Dense seconds for the whole adapter (sampled, scaled) and the worst relative σ mismatch."""
    torch.set_num_threads(cores)
    per_layer, worst = 0.0, 0.0
    layers = len(adapter.modules) // len(SHAPES)
    for name in SAMPLE:
        m = adapter.modules[f"model.layers.0.{name}"]
        start = time.perf_counter()
        delta = m.scale * (m.B.float() @ m.A.float())
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        B8, A8 = U[:, :NEW_RANK] * S[:NEW_RANK].sqrt(), S[:NEW_RANK].sqrt()[:, None] * Vh[:NEW_RANK]
        seconds = time.perf_counter() - start
        count = sum(1 for n in SHAPES if SHAPES[n] == SHAPES[name])
        per_layer += seconds * count
        factored = factored_svd(m.B, m.A, m.scale).S
        worst = max(worst, float(((factored - S[:RANK].double()).abs() / S[:RANK].double()).max()))
        print(f"  dense {name:18s} {tuple(delta.shape)}: {seconds:7.2f} s  (x{count} per layer)", flush=True)
        del delta, U, Vh, B8, A8
    return per_layer * layers, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2, help="CPU cores for both methods (default 2)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--keep", type=Path, help="build the adapter here and keep it (default: a temporary directory)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="loratools-bench-"))
    try:
        adapter_dir, out_dir = work / "adapter-r64", work / "adapter-r8"
        adapter = build(args.layers)
        save(adapter, adapter_dir, force=True)
        size = (adapter_dir / "adapter_model.safetensors").stat().st_size
        print(f"adapter: {len(adapter.modules)} modules, rank {RANK}, fp16, {size / 1e6:.0f} MB", flush=True)
        factored = time_cli(adapter_dir, out_dir, args.cores)
        ranks = {m.rank for m in load(out_dir).modules.values()}
        dense, worst = time_dense(adapter, args.cores)
        print(f"\n{'method':44s} {'seconds':>10s}")
        print(f"{'factored: loratools resize --rank 8 (process)':44s} {factored:10.2f}")
        print(f"{'dense: B·A + torch.linalg.svd (scaled)':44s} {dense:10.2f}")
        print(f"speed-up: {dense / factored:.0f}x   cores: {args.cores}   output ranks: {sorted(ranks)}")
        print(f"max relative σ difference vs dense SVD: {worst:.2e} (goal <= 1e-4)")
        ok = factored <= 5.0 and dense / factored >= 100 and worst <= 1e-4 and ranks == {NEW_RANK}
        print("goals met" if ok else "GOALS NOT MET")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
