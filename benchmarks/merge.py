"""Benchmark: `loratools merge` vs PEFT's merge_and_unload vs a plain copy, as whole processes.

Generates a synthetic ~1.8 GiB bf16 Llama-shaped checkpoint (hidden 2048, 16 layers, MLP 5632,
vocab 32000; 4 shards + index + config.json that transformers loads as LlamaForCausalLM) and a
rank-16 adapter on the 7 attention/MLP projections, then times, in the same run:

* copy:      ``cp -r BASE OUT`` (the I/O floor),
* loratools: ``loratools merge BASE ADAPTER -o OUT --quiet``,
* peft:      AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload +
             save_pretrained,

plus ``loratools merge --buffered`` (writes through the page cache instead of around it), each with
wall time, CPU time and peak RSS (``/usr/bin/time -v``; getrusage of children otherwise), and the
wall time including a trailing ``sync`` (until the output is on disk, not only in the page cache).
copy and loratools run ``--repeat`` times (best shown: the machine may be shared), PEFT once.  The
source's page cache is warm for all (the checkpoint was just written).

Before each run, dirty pages are synced and the script waits ``--settle`` seconds, so that every
run finds memory in the same state: VMs like our CI's hand freed memory back to their host within
about 2 s, and a process writing into such memory pays a host fault per fresh page (measured here:
buffered writes 0.4-0.6 GiB/s, against 3-4 GiB/s into memory freed a moment earlier).  Without
the wait, ``cp`` reuses the pages the previous run's output just freed while a Python process
spends its first 1.5 s importing torch; ``--settle 0`` shows that case.

    python benchmarks/merge.py [--dir /tmp] [--keep] [--repeat 3] [--settle 5] [--device cpu|cuda] [--skip-peft]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, LAYERS, MLP, VOCAB, RANK = 2048, 16, 5632, 32000, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 500 * 2**20

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
LORATOOLS_SCRIPT = "import sys; from loratools.cli import main; sys.exit(main())"


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{t}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, MLP)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def make_base(root: Path) -> int:
    """Write the sharded checkpoint; returns its size in bytes."""
    from loratools.io.tensorfile import write_file

    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in _shapes().items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) if len(shape) > 1 else torch.ones(shape, dtype=torch.bfloat16)
        if sum(x.nbytes for x in shards[-1].values()) + t.nbytes > SHARD_BYTES:
            shards.append({})
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(root / fname, tensors, {"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return size


def make_adapter(path: Path, base: Path) -> None:
    from loratools import Adapter, LoraModule, save

    gen = torch.Generator().manual_seed(1)
    modules = {}
    for name, shape in _shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out, inp = shape
            A = torch.randn(RANK, inp, generator=gen) / inp**0.5
            B = torch.randn(out, RANK, generator=gen) * 0.01
            modules[module] = LoraModule(A, B, alpha=2 * RANK)
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }
    save(Adapter(modules, config), path)


Timing = tuple[float, float, float, float]
"""wall seconds, peak RSS in MiB, CPU seconds (user+sys), wall seconds including a trailing sync"""


def timed(cmd: list[str], settle: float) -> Timing:
    """Sync, wait ``settle`` seconds, then run ``cmd`` to completion and time it, and its sync."""
    subprocess.run(["sync"], check=True)
    time.sleep(settle)
    report = None
    if Path("/usr/bin/time").exists():
        fd, name = tempfile.mkstemp(suffix=".time")
        os.close(fd)
        report = Path(name)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    wrapped = ["/usr/bin/time", "-v", "-o", str(report), *cmd] if report else cmd
    subprocess.run(wrapped, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    subprocess.run(["sync"], check=True)
    synced = time.perf_counter() - start
    if report is None:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # maxrss: the largest child so far
        return wall, after.ru_maxrss / 1024, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, synced
    text = report.read_text()
    report.unlink()
    fields = dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if ": " in line)
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return wall, int(fields["Maximum resident set size (kbytes)"]) / 1024, cpu, synced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the data (deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--skip-peft", action="store_true", help="time only copy and loratools")
    parser.add_argument("--device", default="cpu", help="loratools --device")
    parser.add_argument("--repeat", type=int, default=3, help="runs of copy and loratools (best is shown); PEFT runs once")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each run (see the module docstring)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loratools-merge-bench-", dir=args.dir))
    env_path = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        base, adapter = work / "base", work / "adapter"
        size = make_base(base)
        make_adapter(adapter, base)
        print(
            f"checkpoint: {size / 2**30:.2f} GiB bf16, {LAYERS} layers; adapter rank {RANK} on {len(TARGETS)} targets; "
            f"{os.cpu_count()} CPU(s), torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}"
        )
        merge_cmd = [sys.executable, "-c", LORATOOLS_SCRIPT, "merge", str(base), str(adapter), "-o", str(work / "out"), "--quiet"]
        runs = {
            "copy (cp -r)": ["cp", "-r", str(base), str(work / "out")],
            "loratools merge": [*merge_cmd, "--device", args.device],
            "loratools --buffered": [*merge_cmd, "--device", args.device, "--buffered"],
            "peft merge_and_unload": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "out")],
        }
        if args.skip_peft:
            del runs["peft merge_and_unload"]
        rows = []
        for label, cmd in runs.items():
            best = None
            for _ in range(args.repeat if "peft" not in label else 1):  # best of N: the machine may be shared
                result = timed(cmd, args.settle)
                shutil.rmtree(work / "out")
                best = result if best is None or result[0] < best[0] else best
            rows.append((label, best))
        print(f"settle {args.settle:g} s; best of {args.repeat} for copy and loratools")
        print(f"{'':24}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>15}{'GiB/s':>8}{'wall+sync s':>13}")
        for label, (wall, rss, cpu, synced) in rows:
            print(f"{label:24}{wall:9.2f}{cpu:8.2f}{rss:15.0f}{size / 2**30 / wall:8.2f}{synced:13.2f}")
        (copy_s, _, _, copy_synced), (lt_s, lt_rss, _, lt_synced) = rows[0][1], rows[1][1]
        print(f"loratools / copy: {lt_s / copy_s:.2f}x wall (goal <= 2.5x); {lt_synced / copy_synced:.2f}x until on disk")
        if len(rows) > 3:
            peft_s, peft_rss, _, _ = rows[3][1]
            print(f"peft / loratools: {peft_s / lt_s:.1f}x faster (goal >= 6x); RSS {100 * lt_rss / peft_rss:.0f}% of PEFT's (goal <= 25%)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
