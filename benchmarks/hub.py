"""What verified pulls cost: ``loratools.pull`` against a bare ``snapshot_download`` of the same files.

Both fetch a ~64 MiB adapter (32 modules of rank 64 on 4096-wide layers) from the loopback test
Hub server into an empty cache; ``pull`` also hashes every byte against the Hub's LFS sha256 as it
arrives, copies the files into their own directory, checks the spec and the ``loratools.sha256``
checksum, and renames the directory into place.  Run from the
repository root:  ``python -m benchmarks.hub``
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import disable_progress_bars

import loratools
from loratools.adapter import Adapter, LoraModule
from loratools.api import save
from loratools.io.remote import ADAPTER_FILES
from tests.hub.server import HubServer

REPO = "bench/adapter"
ROUNDS = 5


def big_adapter(modules: int = 32, rank: int = 64, width: int = 4096) -> Adapter:
    g = torch.Generator().manual_seed(0)
    return Adapter(
        {
            f"model.layers.{i}.mlp.proj": LoraModule(
                torch.randn(rank, width, generator=g), torch.randn(width, rank, generator=g), 2.0 * rank
            )
            for i in range(modules)
        },
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["proj"]},
    )


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_OFFLINE = False
    disable_progress_bars()
    with HubServer() as hub, tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = save(big_adapter(), root / "adapter")
        size = sum((source / n).stat().st_size for n in ADAPTER_FILES)
        loratools.push(source, REPO, endpoint=hub.url)
        bare, verified = [], []
        for i in range(ROUNDS):
            bare.append(timed(snapshot_download, REPO, allow_patterns=list(ADAPTER_FILES), cache_dir=root / f"c{i}", endpoint=hub.url))
            constants.HF_HUB_CACHE = str(root / f"p{i}")  # pull uses the default cache: make it cold too
            verified.append(timed(loratools.pull, REPO, out=root / f"out{i}", endpoint=hub.url))
    b, v = statistics.median(bare), statistics.median(verified)
    print(f"adapter: {size / 2**20:.1f} MiB, median of {ROUNDS} cold-cache downloads over loopback")
    print(f"snapshot_download (bare)      {b * 1000:8.1f} ms")
    print(f"loratools.pull (verified)     {v * 1000:8.1f} ms   overhead {v - b:+.3f} s ({v / b:.2f}x)")


if __name__ == "__main__":
    main()
