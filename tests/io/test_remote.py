"""hf:// references to one file of a repo wherever a path is accepted, and what happens to a fetched copy that is bad.

Against the loopback Hub (tests/hub/server.py) with the real huggingface_hub client; no mocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools
from loratools import spec
from loratools.errors import HubError
from loratools.io.remote import fetch, resolve

from ..hub.fixtures import UNET, host, kohya_file, sd_base, tiny_adapter

pytest_plugins = ["tests.hub.fixtures"]  # the hub and hub_server fixtures

LORAS = "me/sd-loras"
STORAGE = Path("hf-home") / "hub" / "models--me--sd-loras"


def blobs(tmp_path: Path) -> list[str]:
    folder = tmp_path / STORAGE / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def local(tmp_path) -> Path:
    return kohya_file(tmp_path / "pixel.safetensors")


def test_hf_file_reference_loads_validates_and_merges_like_the_local_file(hub, tmp_path, local):
    host(hub, LORAS, {"v1/pixel.safetensors": local.read_bytes()})
    ref = f"hf://{LORAS}/v1/pixel.safetensors"
    a, b = loratools.load(local), loratools.load(ref)
    assert a.modules.keys() == b.modules.keys() and all(torch.equal(a.modules[k].B, b.modules[k].B) for k in a.modules)
    assert b.metadata.get(spec.META_SOURCE) == "kohya"
    assert loratools.validate(ref).ok
    base = sd_base(tmp_path / "base.safetensors")
    loratools.merge(base, [local], out=tmp_path / "from-local.safetensors")
    loratools.merge(base, [ref], out=tmp_path / "from-hub.safetensors")
    assert (tmp_path / "from-local.safetensors").read_bytes() == (tmp_path / "from-hub.safetensors").read_bytes()
    merged, original = load_file(tmp_path / "from-hub.safetensors"), load_file(base)
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(merged[key], original[key])  # the LoRA landed


def test_file_reference_fetches_that_file_and_its_neighbouring_config_only(hub, tmp_path):
    adapter_dir = loratools.save(tiny_adapter(), tmp_path / "peft")
    files = {f"sub/{n}": (adapter_dir / n).read_bytes() for n in (spec.CONFIG_NAME, spec.WEIGHTS_NAME)}
    host(hub, LORAS, {**files, "unrelated.safetensors": b"x" * 64})
    snapshot, _, fetched = fetch(LORAS, None, filename=f"sub/{spec.WEIGHTS_NAME}")
    assert fetched == (f"sub/{spec.WEIGHTS_NAME}", f"sub/{spec.CONFIG_NAME}")  # read as it sits in the repo, whatever is cached
    assert not (snapshot / "unrelated.safetensors").exists()
    remote = loratools.load(f"hf://{LORAS}/sub/{spec.WEIGHTS_NAME}")
    assert remote.config["target_modules"] == ["q_proj", "v_proj"]


def test_a_copy_that_fails_validation_is_evicted_by_load_and_validate(hub, tmp_path):
    bad = kohya_file(tmp_path / "half.safetensors", **{"lora_unet_x.lora_up.weight": torch.zeros(8, 2)})  # an up without its down
    host(hub, LORAS, {"half.safetensors": bad.read_bytes()})
    ref = f"hf://{LORAS}/half.safetensors"
    with pytest.raises((loratools.FormatError, loratools.InvalidAdapterError)):
        loratools.load(ref)
    assert blobs(tmp_path) == []  # not reused: fetched again next time (online) ...
    with pytest.raises(HubError, match="the cached copy lacks half.safetensors; pull it again online"):
        fetch(LORAS, None, filename="half.safetensors", offline=True)  # ... and refused offline
    assert not loratools.validate(ref).ok
    assert blobs(tmp_path) == []


def test_a_misfit_with_a_base_keeps_the_sound_copy(hub, tmp_path, local):
    host(hub, LORAS, {"pixel.safetensors": local.read_bytes()})
    ref = f"hf://{LORAS}/pixel.safetensors"
    other = tmp_path / "other-base.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(other))  # none of the kohya names maps onto it
    with pytest.raises(loratools.InvalidAdapterError):
        loratools.load(ref, base=other)
    assert len(blobs(tmp_path)) == 1  # the file is fine on its own: kept


def test_a_cached_blob_changed_on_disk_is_fetched_again_online_and_refused_offline(hub, tmp_path, local):
    data = local.read_bytes()
    host(hub, LORAS, {"pixel.safetensors": data})
    ref = f"hf://{LORAS}/pixel.safetensors"
    path, _ = resolve(ref)
    blob = Path(os.path.realpath(path))
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # rot in the cache
    with pytest.raises(HubError, match="the cached pixel.safetensors does not hash to its blob name; refused"):
        fetch(LORAS, None, filename="pixel.safetensors", offline=True)
    served = len([r for r in hub.state.requests if "/resolve/" in r])
    assert loratools.validate(ref).ok and blob.read_bytes() == data  # online: verified against the listing, fetched again
    assert len([r for r in hub.state.requests if "/resolve/" in r]) == served + 1
