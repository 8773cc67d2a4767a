"""Benchmark: merge methods, in the same run on the same machine.

1. ``loratools merge BASE A B --method ties --density 0.5`` against the exact-sum merge of the same
   two rank-16 adapters, both as whole processes, on the ~1.8 GiB bf16 Llama-shaped fixture of
   benchmarks/merge.py.  Goal: ties within 2x the exact sum's wall time.
2. ``add --method ties --density 0.5 --rank 16`` of two 7B-shaped rank-64 adapters
   (benchmarks/resize.py's shapes) against PEFT 0.21's ties_svd steps per module (what
   ``add_weighted_adapter(..., combination_type="ties_svd")`` runs, peft/tuners/lora/model.py:
   get_delta_weight, merge_utils.ties, torch.linalg.svd with full_matrices=True, its default; keep 16).
   Both are timed on whole modules of layer 0, one per SVD shape class (q_proj 4096 x 4096 for the 4
   attention modules of a layer; gate_proj 11008 x 4096 for the 3 MLP modules, down_proj being its
   transpose: the same SVD cost), and scaled up to the 224 modules, as benchmarks/resize.py does for
   its dense peer (~4 minutes on 2 shared cores).  ``--add-quick`` times q_proj only and scales the
   MLP class from it by the operation counts of an SVD with vectors (Golub & Van Loan, Matrix
   Computations, R-SVD: thin U 6mn² + 20n³ for ours, full U and V 4m²n + 22n³ for PEFT's); measured,
   that model underestimates both, PEFT's full U of 11008² twice as much, so the quick speed-up is
   conservative.  The Frobenius errors of both rank-16 results against the exact TIES ΔW are printed.

    python benchmarks/merge_methods.py [--dir /tmp] [--cores 2] [--repeat 3] [--skip-merge] [--skip-add] [--add-quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge as merge_bench  # noqa: E402
import resize as resize_bench  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

from loratools import Adapter, load, save  # noqa: E402
from loratools.ops.combine import combine  # noqa: E402

CLI = [sys.executable, "-c", merge_bench.LORATOOLS_SCRIPT]


def second_adapter(first: Path, path: Path) -> None:
    """Adapter B: A's shapes and config with freshly drawn factors (seed 2)."""
    a = load(first)
    gen = torch.Generator().manual_seed(2)
    modules = {}
    for name, m in a.modules.items():
        A = torch.randn(m.A.shape, generator=gen) / m.A.shape[1] ** 0.5
        B = torch.randn(m.B.shape, generator=gen) * 0.01
        modules[name] = type(m)(A.to(m.A.dtype), B.to(m.B.dtype), m.alpha)
    save(Adapter(modules, a.config), path)


def bench_merge(work: Path, settle: float, repeat: int) -> None:
    base, a, b = work / "base", work / "a", work / "b"
    size = merge_bench.make_base(base)
    merge_bench.make_adapter(a, base)
    second_adapter(a, b)
    print(f"base: {size / 2**30:.2f} GiB bf16; two rank-{merge_bench.RANK} adapters; {repeat} alternating runs each", flush=True)
    runs: dict[str, list[tuple[float, float, float]]] = {"exact sum": [], "ties 0.5": []}
    for _ in range(repeat):  # alternating, so a slow spell of a shared machine lands on both
        for label, extra in (("exact sum", []), ("ties 0.5", ["--method", "ties", "--density", "0.5"])):
            out = work / "out"
            wall, rss, cpu, _ = merge_bench.timed([*CLI, "merge", str(base), str(a), str(b), "-o", str(out), "--quiet", *extra], settle)
            shutil.rmtree(out, ignore_errors=True)
            runs[label].append((wall, rss, cpu))
            print(f"  merge {label:10s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak RSS {rss:7.0f} MiB", flush=True)
    best = {label: min(r[0] for r in rs) for label, rs in runs.items()}
    paired = [t[0] / e[0] for e, t in zip(runs["exact sum"], runs["ties 0.5"], strict=True)]
    ratio = best["ties 0.5"] / best["exact sum"]
    print(f"run by run: {', '.join(f'{p:.2f}x' for p in paired)}")
    print(f"merge --method ties / exact sum, best of each: {ratio:.2f}x (goal <= 2x): {'met' if ratio <= 2 else 'NOT MET'}")


def svd_ops(m: int, n: int, *, full: bool) -> float:
    """Operation count of an m x n SVD with vectors (Golub & Van Loan, R-SVD): thin U, or full U and V (a model of LAPACK's cost)."""
    m, n = max(m, n), min(m, n)
    return 4 * m * m * n + 22 * n**3 if full else 6 * m * n * n + 20 * n**3


def time_module(a: Adapter, b: Adapter, key: str, rank: int) -> tuple[float, float, float, float]:
    """(ours s, ours rel err, PEFT s, PEFT rel err) for one module: combine() vs PEFT's ties_svd steps."""
    one_a, one_b = (Adapter({key: x.modules[key]}, x.config) for x in (a, b))
    start = time.perf_counter()
    ours, _ = combine(one_a, one_b, method="ties", density=0.5, rank=rank)
    ours_t = time.perf_counter() - start
    start = time.perf_counter()
    deltas = [x.modules[key].scale * (x.modules[key].B.float() @ x.modules[key].A.float()) for x in (a, b)]
    exact = merge_utils.ties(deltas, torch.tensor([1.0, 1.0]), 0.5, "total")
    U, S, Vh = torch.linalg.svd(exact, full_matrices=True)
    peft_delta = (U[:, :rank] @ torch.diag(S[:rank])) @ Vh[:rank, :]
    peft_t = time.perf_counter() - start
    m = ours.modules[key]
    ours_err = float((m.scale * (m.B.float() @ m.A.float()) - exact).norm() / exact.norm())
    peft_err = float((peft_delta - exact).norm() / exact.norm())
    return ours_t, ours_err, peft_t, peft_err


def bench_add(cores: int, quick: bool) -> None:
    torch.set_num_threads(cores)
    a, b = resize_bench.build(1, seed=0), resize_bench.build(1, seed=1)
    layers, rank = 32, 16
    classes = {  # shape class -> (sampled module, modules per layer)
        "attention": ("self_attn.q_proj", 4),
        "mlp": ("mlp.gate_proj", 3),  # gate, up (11008 x 4096) and down (its transpose: the same SVD cost)
    }
    measured: dict[str, tuple[float, float]] = {}
    ours_s = peft_s = 0.0
    for label, (name, count) in classes.items():
        out, inp = resize_bench.SHAPES[name]
        if label == "attention" or not quick:
            ours_t, ours_err, peft_t, peft_err = time_module(a, b, f"model.layers.0.{name}", rank)
            measured[label] = (ours_t, peft_t)
            how = f"measured (rel err ours {ours_err:.5f}, PEFT {peft_err:.5f})"
        else:
            q_out, q_in = resize_bench.SHAPES[classes["attention"][0]]
            ours_q, peft_q = measured["attention"]
            ours_t = ours_q * svd_ops(out, inp, full=False) / svd_ops(q_out, q_in, full=False)
            peft_t = peft_q * svd_ops(out, inp, full=True) / svd_ops(q_out, q_in, full=True)
            how = "scaled from q_proj by SVD operation counts"
        print(f"  {name:18s} {out}x{inp} x{count}/layer: ours {ours_t:7.2f} s  PEFT ties_svd {peft_t:7.2f} s  {how}", flush=True)
        ours_s += ours_t * count * layers
        peft_s += peft_t * count * layers
    print(f"add --method ties --rank 16, 224 modules (scaled): ours {ours_s:.0f} s, PEFT ties_svd {peft_s:.0f} s")
    print(f"speed-up {peft_s / ours_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each merge (best of each is compared)")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-add", action="store_true")
    parser.add_argument("--add-quick", action="store_true", help="time q_proj only; scale the MLP modules from it (conservative)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loratools-methods-", dir=args.dir))
    try:
        if not args.skip_add:
            bench_add(args.cores, args.add_quick)
        if not args.skip_merge:
            bench_merge(work, args.settle, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
