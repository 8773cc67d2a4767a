"""Fixtures for Hub tests: our loopback server and a huggingface_hub with nothing of the user's.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once,
at import, so the ``hub_env`` fixture sets both the environment and the module constants: cache and
token file under ``tmp_path``, no ``HF_TOKEN``, online, Xet off, the default endpoint on our server
(model-card and ``hf://`` paths use it).  Test modules load this file with ``pytest_plugins``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import disable_progress_bars
from safetensors.torch import save_file

from loratools.adapter import Adapter, LoraModule
from loratools.api import save

from .server import HubServer, Repo


@pytest.fixture(scope="module")
def hub_server() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The running server with fresh state, and huggingface_hub isolated and pointed at it."""
    state = hub_server.state
    with state.lock:
        state.repos.clear()
        state.served.clear()
        state.truncate.clear()
        state.drop.clear()
        state.ranges.clear()
        state.unsafe_names.clear()
        state.requests.clear()
        state.auth_headers.clear()
        state.token = state.read_only_token = None
        state.yaml_errors.clear()
        state.etags.clear()
        state.commit_sha = state.repo_commit = state.info_raw = state.fail = None
        state.redirect_loop.clear()
        state.stall.clear()
        state.silent.clear()
        state.release.clear()
    home = tmp_path / "hf-home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)
    monkeypatch.setattr(constants, "DEFAULT_ETAG_TIMEOUT", 10)
    monkeypatch.chdir(tmp_path)
    disable_progress_bars()
    yield hub_server
    state.release.set()  # let any stalled handler finish


def tiny_adapter(seed: int = 0) -> Adapter:
    """Two 4x3 rank-2 modules with hand-sized values; base recorded as a Hub repo id."""
    g = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{i}.self_attn.{p}": LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 4.0)
        for i in range(1)
        for p in ("q_proj", "v_proj")
    }
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "org/tiny-base",
    }
    return Adapter(modules, config)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return save(tiny_adapter(), tmp_path / "my-adapter")


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """``make_adapter(name, seed=0)`` saves :func:`tiny_adapter` under ``tmp_path``; ``*.safetensors`` gives one file."""
    return lambda name, seed=0: save(tiny_adapter(seed), tmp_path / name)


UNET = "model.diffusion_model."


def sd_base(path: Path) -> Path:
    """A tiny SD1-style single-file checkpoint with the two layers :func:`kohya_file` adapts (a 3x3 conv, a linear) and a norm."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        UNET + "input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g),
        UNET + "input_blocks.1.1.norm.weight": torch.ones(8),
    }
    save_file(tensors, str(path))
    return path


def kohya_file(path: Path, seed: int = 1, **extra: torch.Tensor) -> Path:
    """A kohya (sd-scripts) LoRA for :func:`sd_base`: a rank-2 conv with alpha 1 and a rank-2 linear with alpha 0.5."""
    g = torch.Generator().manual_seed(seed)
    conv, linear = "lora_unet_input_blocks_0_0", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{conv}.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
        f"{conv}.lora_up.weight": torch.randn(8, 2, 1, 1, generator=g),
        f"{conv}.alpha": torch.tensor(1.0, dtype=torch.float16),
        f"{linear}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{linear}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{linear}.alpha": torch.tensor(0.5, dtype=torch.float16),
        **extra,
    }
    save_file(tensors, str(path), metadata={"ss_network_dim": "2", "ss_output_name": "tiny"})
    return path


def host(hub: HubServer, repo_id: str, files: dict[str, bytes], message: str = "upload") -> str:
    """Put ``files`` (repo path -> bytes) on the server's ``main`` of ``repo_id`` (created if missing); the commit sha."""
    with hub.state.lock:
        if repo_id not in hub.state.repos:
            hub.state.repos[repo_id] = Repo()
        return hub.state.commit(repo_id, "main", files, message).sha
