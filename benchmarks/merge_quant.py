"""Benchmark: `loratools merge --dtype keep` into an FP8 block-scaled base vs the bf16 merge of the same shapes.

Generates, in the same run, the Llama-shaped bf16 checkpoint of ``benchmarks/merge.py`` (hidden
2048, MLP 5632, vocab 32000; ``--layers`` decoder layers, 30 by default) and its FP8 twin the way
DeepSeek-V3 / Qwen3-FP8 ship: every decoder projection in float8_e4m3fn with 128 x 128 F32
``weight_scale_inv`` block scales and ``quantization_config`` in config.json, embeddings, norms and
head in bf16 (about 1.8 GiB at 30 layers).  One rank-16 adapter on the 7 projections is merged
into each as a whole process (``loratools merge ... --quiet``), timed with wall time, CPU time and
peak RSS (as benchmarks/merge.py does), and compared per output byte:

    time per output byte (FP8 keep) / time per output byte (bf16)    goal <= 2x

Peak RSS is shown against the largest tensor (its float32 size): streaming keeps a few row blocks
and a few copies of one tensor in memory, never the model.

    python benchmarks/merge_quant.py [--dir /tmp] [--layers 30] [--repeat 5] [--settle 2] [--keep]

Measured (2 CPUs of a shared VM, torch 2.13 CPU, numba 0.68; the two merges alternate, best of
``--repeat`` each, and every pair's ratio is printed: single runs move by 20-40%).
Eager torch, first: bf16 6.95 s, FP8 keep 13.3 s (18.1 s CPU): 3.5x the time per output byte.
Decode and requantization as two compiled passes over a float32 row block, ΔW from torch.mm:
bf16 5.73 s, FP8 9.39 s (12.1 s CPU), 3.0x.  One compiled call per row block
(``loratools/fused/e4m3_loops.py`` ``merge_requantize``: W' = W + ΔW formed inside the decode, ΔW
by ``LowRank``'s rule, each 512-column strip of blocks requantized while it is still in cache), row
blocks handed to the pool without waiting: bf16 5.13 s, FP8 keep 6.32 s (8.9 s CPU), 2.28x, of
which 0.8-1.0 s was numba's import and start, which the first FP8 row block waited for.  Now the
loops are linked from a cached image of their machine code without numba (``fused/native.py``:
0.1 s) and the CPU output pool has a third buffer (the pool threads waited 0.4 s each for the next
tensor, behind a slow direct write; now 0.15-0.2 s), 1.68 GiB out against 3.12 GiB, three runs of
``--repeat 5``: bf16 5.77 s (7.0 s CPU), FP8 keep 5.63 s (7.8 s CPU), 1.81x (pairs 1.86x, 1.80x,
1.98x, 1.76x, 1.77x); bf16 5.33 s, FP8 5.87 s (8.1 s CPU), 2.04x (pairs 1.85x, 1.71x, 2.15x,
1.82x, 2.10x); bf16 5.86 s, FP8 5.87 s (8.0 s CPU), 1.86x (pairs 1.86x, 2.02x, 1.97x, 1.69x,
1.78x).  Peak RSS 536 MiB (it was 584 MiB with numba's runtime loaded), 2.1x the largest tensor's
float32 size.

Where the FP8 run's time goes: imports 2.5 s, as the bf16 run's; planning 0.3 s (0.2 s for bf16);
the loops 4.7-5.3 thread seconds over 1.54 G weights (1.9 ns per weight on one thread in cache:
the rank-16 product 0.6, decode and merge 0.6, requantization 0.45, survival norms 0.25), on both
CPUs with the main, reader and writer threads (about 0.9 s of CPU between them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("merge_bench", _HERE / "merge.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BLOCK = (128, 128)


def make_fp8(bf16: Path, root: Path) -> int:
    """The FP8 twin of checkpoint ``bf16``: projections quantized by the codec's rule, shard for shard; returns bytes."""
    from loratools.io.checkpoint import open_checkpoint
    from loratools.io.quant.fp8_block import CODEC
    from loratools.io.tensorfile import TensorInfo, load_tensors, write_file

    root.mkdir(parents=True)
    checkpoint = open_checkpoint(bf16)
    weight_map, size = {}, 0
    for shard in checkpoint.shards:
        out: dict[str, torch.Tensor] = {}
        for name, t in load_tensors(checkpoint.headers[shard.name]).items():
            if ".layers." in name and name.endswith("proj.weight"):
                grid = (-(-t.shape[0] // BLOCK[0]), -(-t.shape[1] // BLOCK[1]))
                infos = {"w.weight": TensorInfo("w.weight", "F8_E4M3", tuple(t.shape), 0, 0)}
                infos["w.weight_scale_inv"] = TensorInfo("w.weight_scale_inv", "F32", grid, 0, 0)
                q = CODEC.claims({"weight_block_size": list(BLOCK)}, infos)[0]["w.weight"]
                parts = CODEC.quantize(q, t.float(), CODEC.all_rows(q), {"weight_scale_inv": torch.ones(grid)})
                out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = parts["weight"], parts["weight_scale_inv"]
            else:
                out[name] = t
        write_file(root / shard.name, out, {"format": "pt"})
        weight_map.update({k: shard.name for k in out})
        size += sum(t.nbytes for t in out.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the data (deleted afterwards)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30: an FP8 checkpoint of about 1.8 GiB)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs of each merge (best of each is compared)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each run (see benchmarks/merge.py)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    bench.LAYERS = args.layers
    work = Path(tempfile.mkdtemp(prefix="loratools-quant-bench-", dir=args.dir))
    os.environ["PYTHONPATH"] = str(_HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        bf16, fp8, adapter = work / "bf16", work / "fp8", work / "adapter"
        bf16_size = bench.make_base(bf16)
        fp8_size = make_fp8(bf16, fp8)
        bench.make_adapter(adapter, bf16)
        largest = max(s[0] * (s[1] if len(s) > 1 else 1) for s in bench._shapes().values()) * 4
        print(
            f"bf16 {bf16_size / 2**30:.2f} GiB and FP8 {fp8_size / 2**30:.2f} GiB ({BLOCK[0]}x{BLOCK[1]} block scales), "
            f"{args.layers} layers; adapter rank {bench.RANK} on {len(bench.TARGETS)} targets; {os.cpu_count()} CPU(s), "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}"
        )
        warm = "from loratools.fused import e4m3; e4m3.load(); print(e4m3.LOOPS.backend)"
        backend = subprocess.run([sys.executable, "-c", warm], capture_output=True, text=True, check=True).stdout.strip()
        print(f"FP8 loops from: {backend} (loaded once before timing, as a machine's second merge finds them)")
        runs: dict[str, list[tuple[bench.Timing, int]]] = {"bf16 merge": [], "FP8 merge --dtype keep": []}
        for _ in range(args.repeat):  # alternating, so a slow spell of a shared machine lands on both
            for label, base in (("bf16 merge", bf16), ("FP8 merge --dtype keep", fp8)):
                cmd = [sys.executable, "-c", bench.LORATOOLS_SCRIPT, "merge", str(base), str(adapter), "-o", str(work / "out"), "--quiet"]
                result = bench.timed(cmd, args.settle)
                runs[label].append((result, sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))))
                shutil.rmtree(work / "out")
        rows = {label: min(timings, key=lambda r: r[0][0]) for label, timings in runs.items()}
        pairs = [(f[0][0] / f[1]) / (b[0][0] / b[1]) for b, f in zip(runs["bf16 merge"], runs["FP8 merge --dtype keep"], strict=True)]
        print(f"{'':26}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>15}{'out GiB':>9}{'ns/out byte':>13}")
        per_byte = {}
        for label, ((wall, rss, cpu, _), written) in rows.items():
            per_byte[label] = wall / written
            print(f"{label:26}{wall:9.2f}{cpu:8.2f}{rss:15.0f}{written / 2**30:9.2f}{1e9 * wall / written:13.2f}")
        ratio = per_byte["FP8 merge --dtype keep"] / per_byte["bf16 merge"]
        rss = rows["FP8 merge --dtype keep"][0][1]
        each = ", ".join(f"{r:.2f}x" for r in pairs)
        print(f"FP8 keep / bf16: {ratio:.2f}x time per output byte, best of each (goal <= 2x); each pair: {each}")
        print(f"FP8 peak RSS {rss:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB in float32 ({rss * 2**20 / largest:.1f}x)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
