"""`loratools meta`: metadata edited into a new file, tensors byte for byte, inputs untouched, refusals in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import loratools
from loratools.cli import main
from loratools.io.tensorfile import data_sha256, read_header

TAGS = {"10_sks dog": {"sks dog": 12, "grass": 3, " outdoors": 2}, "5_style": {"grass": 4, "sks dog": 1}}


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def kohya_file(tmp_path):
    """A kohya LoRA (8 x 12 linear, rank 2, alpha 1) with sd-scripts-style training metadata and hashes."""
    path = tmp_path / "lora.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_proj_in.lora_down.weight": torch.randn(2, 12, generator=g).half(),
        "lora_unet_proj_in.lora_up.weight": torch.randn(8, 2, generator=g).half(),
        "lora_unet_proj_in.alpha": torch.tensor(1.0),
    }
    metadata = {
        "ss_network_dim": "2",
        "ss_network_alpha": "1.0",
        "ss_output_name": "dog",
        "ss_tag_frequency": json.dumps(TAGS),
        "sshs_model_hash": "ab" * 32,
        "modelspec.hash_sha256": "0x" + "cd" * 32,
        "modelspec.title": "dog",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_set_and_delete_keep_tensors_byte_identical(runner, tmp_path, kohya_file):
    before = _digest(kohya_file)
    out = tmp_path / "tagged.safetensors"
    args = ["meta", str(kohya_file), "--set", "modelspec.trigger_phrase=sks dog, a=b", "--delete", "ss_tag_frequency", "-o", str(out)]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["set"] == {"modelspec.trigger_phrase": "sks dog, a=b"} and report["deleted"] == ["ss_tag_frequency"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("lora_unet_proj_in.lora_up.weight"), loratools.load(kohya_file).modules["lora_unet_proj_in"].B)
    assert meta["modelspec.trigger_phrase"] == "sks dog, a=b" and "ss_tag_frequency" not in meta
    assert meta["sshs_model_hash"] == "ab" * 32  # the data section is unchanged, so its hashes stay true
    assert data_sha256(read_header(out)) == data_sha256(read_header(kohya_file))
    assert _digest(kohya_file) == before  # the input is untouched
    assert loratools.load(out).modules["lora_unet_proj_in"].rank == 2


def test_text_output_names_the_changes(runner, tmp_path, kohya_file):
    result = runner.invoke(main, ["meta", str(kohya_file), "--delete", "sshs_model_hash", "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0, result.output
    assert "deleted sshs_model_hash" in result.stdout and "tensors copied unchanged" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--set", "loratools.sha256=00"], 2, "loratools' or safetensors' own"),
        (["--delete", "format"], 2, "own"),
        (["--delete", "nope"], 2, "no such key"),
        (["--set", "a=1", "--delete", "a"], 2, "both set and deleted"),
        (["--set", "novalue"], 2, "KEY=VALUE"),
        (["--set", "a=1", "--set", "a=2"], 2, "set twice"),
        ([], 2, "nothing to change"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(runner, tmp_path, kohya_file, args, code, words):
    out = tmp_path / "o.safetensors"
    result = runner.invoke(main, ["meta", str(kohya_file), *args, "-o", str(out)])
    assert result.exit_code == code and words in result.output and not out.exists()
    assert "Traceback" not in result.output


def test_output_may_not_be_the_input(runner, tmp_path, kohya_file):
    before = _digest(kohya_file)
    for target in (kohya_file, tmp_path / "." / kohya_file.name):
        result = runner.invoke(main, ["meta", str(kohya_file), "--set", "a=1", "-o", str(target), "--force"])
        assert result.exit_code == 2 and "inputs are never modified" in result.output
    assert _digest(kohya_file) == before


def test_existing_output_needs_force(runner, tmp_path, kohya_file):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    result = runner.invoke(main, ["meta", str(kohya_file), "--set", "a=1", "-o", str(out)])
    assert result.exit_code == 3 and out.read_bytes() == b"x"
    result = runner.invoke(main, ["meta", str(kohya_file), "--set", "a=1", "-o", str(out), "--force"])
    assert result.exit_code == 0 and read_header(out).metadata["a"] == "1"


def test_inspect_shows_metadata_trigger_and_tags(runner, tmp_path, kohya_file):
    tagged = tmp_path / "t.safetensors"
    loratools.edit_metadata(kohya_file, tagged, set={"modelspec.trigger_phrase": "sks dog", "modelspec.tags": "dog, photo"})
    data = json.loads(runner.invoke(main, ["inspect", str(tagged), "--json"]).stdout)
    assert data["metadata"]["ss_output_name"] == "dog" and "loratools.source_format" not in data["metadata"]
    training = data["training"]
    assert training["trigger_phrase"] == "sks dog" and training["modelspec_tags"] == ["dog", "photo"]
    # summed over the two dataset dirs, names stripped: sks dog 12 + 1, grass 3 + 4, outdoors 2
    assert training["tags"] == [{"tag": "sks dog", "count": 13}, {"tag": "grass", "count": 7}, {"tag": "outdoors", "count": 2}]
    assert training["distinct_tags"] == 3 and training["tag_datasets"] == 2 and training["training"]["ss_network_dim"] == "2"
    text = runner.invoke(main, ["inspect", str(tagged)]).stdout
    assert "trigger phrase: sks dog" in text and "most frequent: sks dog (13), grass (7), outdoors (2)" in text
    assert "ss_tag_frequency = " in text
