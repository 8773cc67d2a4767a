"""loratools quickstart: build a tiny base checkpoint and adapter locally, then run the CLI on them.

Run with `make demo`. Everything is generated here (no downloads); outputs go to ./demo-output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import loratools
from loratools.adapter import Adapter, LoraModule
from loratools.io.tensorfile import write_file

OUT = Path("demo-output")
HIDDEN, MLP, LAYERS, VOCAB, RANK = 64, 128, 2, 100, 8
TARGETS = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "up_proj": (MLP, HIDDEN)}


def build_base(path: Path) -> None:
    """A Llama-shaped checkpoint directory: model.safetensors + config.json, random bf16 weights."""
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(LAYERS):
        for name, shape in {**TARGETS, "k_proj": (HIDDEN, HIDDEN), "down_proj": (HIDDEN, MLP)}.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj")) else "mlp"
            tensors[f"model.layers.{i}.{block}.{name}.weight"] = torch.randn(*shape, generator=g) / HIDDEN**0.5
    tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    path.mkdir(parents=True)
    write_file(path / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in tensors.items()}, {"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}))


def build_adapter(seed: int) -> Adapter:
    """A rank-8 adapter on q/v/up projections, as a fine-tune might leave it."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(LAYERS):
        for name, (out, inp) in TARGETS.items():
            block = "self_attn" if name != "up_proj" else "mlp"
            A = torch.randn(RANK, inp, generator=g) / inp**0.5
            B = torch.randn(out, RANK, generator=g) * 0.05 * 0.6 ** torch.arange(RANK)  # a decaying spectrum, as trained adapters have
            modules[f"model.layers.{i}.{block}.{name}"] = LoraModule(A, B, alpha=16.0)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": sorted(TARGETS), "base_model_name_or_path": "demo-base"}
    return Adapter(modules, config)


def run(*args: str) -> None:
    print(f"\n$ loratools {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "loratools", *args], check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    build_base(OUT / "base")
    loratools.save(build_adapter(seed=1), OUT / "style")
    loratools.save(build_adapter(seed=2), OUT / "subject")
    print(f"built {OUT}/base (tiny Llama-shaped checkpoint) and adapters {OUT}/style, {OUT}/subject")
    run("validate", str(OUT / "style"), "--base", str(OUT / "base"))
    run("inspect", str(OUT / "style"))
    run("resize", str(OUT / "style"), "--energy", "0.9", "-o", str(OUT / "style-small"))
    run("add", str(OUT / "style"), str(OUT / "subject"), "-w", "0.7", "-w", "0.5", "-o", str(OUT / "combined"))
    run("diff", str(OUT / "style"), str(OUT / "combined"))
    run("merge", str(OUT / "base"), str(OUT / "combined"), "-o", str(OUT / "base-merged"))
    run("convert", str(OUT / "style-small"), "--to", "kohya", "-o", str(OUT / "style-small-kohya.safetensors"))
    run("validate", str(OUT / "style-small-kohya.safetensors"), "--base", str(OUT / "base"))
    print("\nquickstart finished: see README.md for the full CLI tour")


if __name__ == "__main__":
    main()
