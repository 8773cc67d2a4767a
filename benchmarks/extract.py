"""Benchmark: `loratools.extract` (randomized range finder) vs the dense full-SVD method, same run.

Builds a synthetic 7B-shaped pair of checkpoints: per layer one 4096 x 4096 (q_proj) and one
11008 x 4096 (up_proj), where tuned = base + ΔW and ΔW has a fine-tune-like spectrum (a decaying
rank-256 part, σᵢ ∝ 1/i, plus small dense noise).  Both methods read the same files tensor by
tensor and produce rank-16 factors; the dense method is what mergekit and sd-scripts do
(``torch.linalg.svd`` of the dense ΔW, keep the top 16).  Reports wall time of each and, per
module, ‖ΔW - B·A‖_F relative to the Eckart-Young optimum (which the dense method attains).

Goal: >= 20x faster at <= 1.05x the optimal error.

    python benchmarks/extract.py [--layers 2] [--rank 16] [--device auto] [--workdir bench-output/extract]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loratools
from loratools.compute import resolve_device

SHAPES = {"self_attn.q_proj": (4096, 4096), "mlp.up_proj": (11008, 4096)}


def _delta(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A fine-tune-like ΔW: rank-256 part with σᵢ = 1/i (scaled), plus noise ~ 1% of its norm."""
    k = 256
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    low = (U * sigma) @ V.T
    return low + 0.01 * float(sigma.norm()) / (m * n) ** 0.5 * torch.randn(m, n, generator=g)


def build(workdir: Path, layers: int) -> tuple[Path, Path]:
    """Write base.safetensors and tuned.safetensors under ``workdir`` (reused if present)."""
    base_path, tuned_path = workdir / "base.safetensors", workdir / "tuned.safetensors"
    if base_path.exists() and tuned_path.exists():
        return base_path, tuned_path
    workdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for layer in range(layers):
        for name, (m, n) in SHAPES.items():
            key = f"model.layers.{layer}.{name}.weight"
            base[key] = torch.randn(m, n, generator=g) * 0.02
            tuned[key] = base[key] + _delta(m, n, g)
    save_file(base, str(base_path))
    save_file(tuned, str(tuned_path))
    return base_path, tuned_path


def dense_extract(base: Path, tuned: Path, rank: int, device: torch.device) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The classic method: dense ΔW, full SVD, keep the top ``rank``; returns factors and seconds."""
    start = time.perf_counter()
    out = {}
    with safe_open(str(base), framework="pt") as fb, safe_open(str(tuned), framework="pt") as ft:
        for key in ft.keys():
            delta = ft.get_tensor(key).to(device) - fb.get_tensor(key).to(device)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            out[key[: -len(".weight")]] = ((U[:, :rank] * S[:rank]).cpu(), Vh[:rank].cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default="bench-output/extract")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for a rerun")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workdir = Path(args.workdir)
    base, tuned = build(workdir, args.layers)
    print(f"device: {device}  threads: {torch.get_num_threads()}  layers: {args.layers}  rank: {args.rank}")

    start = time.perf_counter()
    adapter, _ = loratools.extract(base, tuned, rank=args.rank, device=args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - start
    dense, dense_s = dense_extract(base, tuned, args.rank, device)

    print(f"{'module':<34} {'shape':>13} {'dense err':>11} {'ours err':>11} {'ratio':>7}")
    worst = 0.0
    with safe_open(str(base), framework="pt") as fb, safe_open(str(tuned), framework="pt") as ft:
        for module, (B, A) in dense.items():
            delta = (ft.get_tensor(module + ".weight") - fb.get_tensor(module + ".weight")).double()
            optimal = float((delta - B.double() @ A.double()).norm())  # Eckart-Young: the best rank-r error
            ours = float((delta - adapter.modules[module].delta().double()).norm())
            worst = max(worst, ours / optimal)
            print(f"{module:<34} {' x '.join(map(str, delta.shape)):>13} {optimal:11.5f} {ours:11.5f} {ours / optimal:7.4f}")
    print(f"\n{'':<20}{'dense full SVD':>16}{'loratools extract':>20}")
    print(f"{'wall time (s)':<20}{dense_s:16.2f}{ours_s:20.2f}")
    print(f"{'error vs optimal':<20}{1.0:16.4f}{worst:20.4f}   (worst module)")
    print(f"speedup: {dense_s / ours_s:.1f}x  (goal >= 20x)   error: {worst:.4f}x optimal (goal <= 1.05x)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
