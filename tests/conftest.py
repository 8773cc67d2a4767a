"""Shared fixtures: tiny real models built from configs (never downloaded) and their adapters."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama_config(**overrides):
    """A 2-layer Llama config small enough to build in milliseconds; ``overrides`` replace any field."""
    import transformers

    fields = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    return transformers.LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


def peft_adapter(tmp: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Save a PEFT adapter with non-zero (random) B on a tiny Llama; returns its directory."""
    import peft

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    model = tiny_llama(seed=0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
        pm.save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint directory (model.safetensors + config.json)."""
    path = tmp_path_factory.mktemp("llama-base")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory) -> Path:
    """A PEFT-written adapter for the tiny Llama: r=4, alpha=8, q_proj and v_proj."""
    return peft_adapter(tmp_path_factory.mktemp("peft-adapter"))


def _in_child(fn, args, seconds: int) -> str:
    """Run ``fn(*args)`` in a forked child that cannot hang, fill memory or fill the disk; its outcome as text.

    The child dies by SIGALRM after ``seconds`` (a blocking open of a FIFO included), may allocate
    1 GiB beyond what it inherited and may write files of at most 64 MiB: a regression to reading
    ``/dev/zero`` or copying it fails the test instead of taking the machine down.
    """
    import resource
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            with open("/proc/self/status") as fh:
                vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            signal.alarm(seconds)
            try:
                outcome = f"ok: {fn(*args)!r}"
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(error).__name__}: {error}"
            os.write(write_end, outcome.encode()[:65536])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        outcome = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return outcome or f"child died ({'signal ' + str(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else status}): hung or ran away"


@pytest.fixture()
def guarded():
    """``guarded(fn, *args, seconds=10)``: ``fn``'s outcome (``"ok: ..."`` or ``"ErrorType: message"``) from a bounded child."""

    def run(fn, *args, seconds: int = 10) -> str:
        return _in_child(fn, args, seconds)

    return run
