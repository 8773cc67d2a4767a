"""loratools.metadata: which foreign metadata a writer keeps, what `inspect` reads from it, which edits `meta` allows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loratools
from loratools import metadata
from loratools.errors import ArgumentError
from loratools.io.tensorfile import read_header

HASHED = {"sshs_model_hash": "aa", "sshs_legacy_hash": "bb", "modelspec.hash_sha256": "0xcc", "modelspec.title": "t", "ss_seed": "42"}


def test_kept_drops_hashes_and_rewrites_sizes_only_where_present():
    kept = metadata.kept({**HASHED, "ss_network_dim": "16", "ss_network_alpha": "8"}, ranks=[4, 4], alphas=[2.0, 2.0], dora_axes=set())
    assert kept == {"modelspec.title": "t", "ss_seed": "42", "ss_network_dim": "4", "ss_network_alpha": "2"}
    assert metadata.kept(HASHED, ranks=[4], alphas=[2.0], dora_axes=set()) == {"modelspec.title": "t", "ss_seed": "42"}
    mixed = metadata.kept({"ss_network_dim": "16"}, ranks=[4, 8], alphas=[0.1, 0.1], dora_axes=set())
    assert mixed == {"ss_network_dim": "Dynamic", "ss_network_alpha": "0.10000000149011612"}  # alpha as its float32


@pytest.mark.parametrize(
    ("axes", "args"),
    [
        (set(), {"algo": "lora"}),
        ({"in"}, {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}),
        ({"out"}, {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}),
    ],
)
def test_lycoris_network_args_describe_the_plain_lora_written(axes, args):
    given = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr", "factor": 4})}
    kept = metadata.kept(given, ranks=[8], alphas=[8.0], dora_axes=axes)
    assert kept["ss_network_module"] == "lycoris.kohya" and json.loads(kept["ss_network_args"]) == args


def test_describe_handles_unreadable_tag_frequency():
    assert metadata.describe({"ss_tag_frequency": "{not json"})["tags_unreadable"] == "ss_tag_frequency is not JSON"
    assert "not a {dataset" in metadata.describe({"ss_tag_frequency": "[1, 2]"})["tags_unreadable"]
    assert metadata.describe({})["tags"] == [] and metadata.describe({})["trigger_phrase"] is None


def test_edited_refuses_protected_missing_and_contradictory_keys():
    assert metadata.edited({"a": "1", "b": "2"}, set_={"c": "3"}, delete=["a"]) == {"b": "2", "c": "3"}
    for kwargs in (
        {"set_": {"loratools.config": "{}"}, "delete": []},
        {"set_": {}, "delete": ["x"]},
        {"set_": {"a": "2"}, "delete": ["a"]},
    ):
        with pytest.raises(ArgumentError):
            metadata.edited({"a": "1"}, **kwargs)


def _kohya(path, rank=4):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "lora_unet_proj_in.lora_down.weight": torch.randn(rank, 12, generator=g),
        "lora_unet_proj_in.lora_up.weight": torch.randn(8, rank, generator=g),
        "lora_unet_proj_in.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(path), metadata={**HASHED, "ss_network_dim": str(rank), "ss_network_alpha": "2.0"})
    return path


def test_resize_and_convert_outputs_tell_the_truth(tmp_path):
    """After resize the dims are rewritten and the hashes gone, in kohya and PEFT outputs alike; history stays."""
    adapter = loratools.load(_kohya(tmp_path / "k.safetensors"))
    small, _ = loratools.resize(adapter, 2)
    loratools.save_as(small, tmp_path / "r.safetensors", to="kohya")
    meta = read_header(tmp_path / "r.safetensors").metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_seed"]) == ("2", "2", "42")  # resize gives scale 1: alpha = r
    assert not set(metadata.HASHES) & set(meta)
    save_file({"proj_in.weight": torch.zeros(8, 12)}, str(tmp_path / "base.safetensors"))
    mapped = loratools.load(tmp_path / "k.safetensors", base=tmp_path / "base.safetensors")
    loratools.save_as(mapped, tmp_path / "p.safetensors", to="peft")
    meta = read_header(tmp_path / "p.safetensors").metadata
    assert not set(metadata.HASHES) & set(meta) and meta["modelspec.title"] == "t" and meta["ss_network_dim"] == "4"
