"""Special files as inputs, on the real file system: every one refused within seconds, naming the file.

Each call runs in a bounded child (conftest ``guarded``): a regression that blocks on a FIFO,
reads ``/dev/zero`` or copies it fails the test instead of hanging the suite or filling the disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from loratools.errors import FormatError
from loratools.formats.registry import read_raw
from loratools.io.checkpoint import INDEX_NAME, open_checkpoint
from loratools.io.files import MAX_JSON_BYTES, copy_regular, human_bytes, read_text, tree_files
from loratools.io.mirror import side_files
from loratools.io.tensorfile import read_header, write_file


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _zero_link(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


@pytest.fixture()
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    write_file(path, {"layer.q.weight": torch.ones(4, 3)})
    return path


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1000, 1536, 81 * 2**20, 3 * 2**30 // 2, 2**50)] == [
        "0 B",
        "1000 B",
        "1.5 KiB",
        "81.0 MiB",
        "1.5 GiB",
        "1024.0 TiB",
    ]


def test_fifo_and_device_as_safetensors_file_are_refused(tmp_path, guarded):
    assert "FormatError" in (got := guarded(read_header, _fifo(tmp_path / "a.safetensors"))) and "a FIFO (named pipe)" in got
    got = guarded(read_header, _zero_link(tmp_path / "z.safetensors"))
    assert got.startswith("FormatError: ") and "z.safetensors: is a character device, not a regular file" in got


def test_fifo_adapter_file_and_config(tmp_path, shard, guarded):
    assert "a FIFO (named pipe)" in guarded(read_raw, _fifo(tmp_path / "fifo.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_file(adapter / "adapter_model.safetensors", {"x.lora_A.weight": torch.ones(2, 3)})
    for make in (_fifo, _zero_link):
        config = make(adapter / "adapter_config.json")
        got = guarded(lambda p: read_raw(p).config_error, adapter)
        assert f"{config}: is a " in got and "not a regular file" in got, got
        config.unlink()


def test_fifo_base_index_and_shard(tmp_path, shard, guarded):
    got = guarded(open_checkpoint, _fifo(tmp_path / "base"))
    assert "is a FIFO (named pipe), not a file or directory" in got and "no model.safetensors" not in got
    base = tmp_path / "dir"
    base.mkdir()
    for make in (_fifo, _zero_link):
        index = make(base / INDEX_NAME)
        assert f"{index}: is a " in guarded(open_checkpoint, base)
        index.unlink()
    (base / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    _fifo(base / "model-00001.safetensors")
    assert "model-00001.safetensors: is a FIFO" in guarded(open_checkpoint, base)


def test_json_over_the_cap_is_refused_without_reading_it(tmp_path, guarded):
    big = tmp_path / "config.json"
    with open(big, "wb") as fh:
        fh.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used
    got = guarded(read_text, big)
    assert got == f"FormatError: {big}: is 64.0 MiB, more than the 64.0 MiB loratools reads of a JSON file; is it the right file?"
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FormatError, match=r"bad.json: is not UTF-8 text \(byte 7\)"):
        read_text(tmp_path / "bad.json")


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    write_file(base / "model.safetensors", {"layer.q.weight": torch.ones(4, 3)})
    (base / "config.json").write_text("{}")
    return base


def test_side_files_special_and_escaping_links_are_refused(tmp_path, guarded):
    base = _base(tmp_path)
    link = _zero_link(base / "tokenizer.model")  # copied, it would fill the disk
    got = guarded(side_files, base, {"model.safetensors"})
    assert got.startswith(f"FormatError: {link}: is a symlink to /dev/zero, outside the base; only files inside the base are copied")
    link.unlink()
    (base / "tokenizer").symlink_to("/etc")
    got = guarded(side_files, base, {"model.safetensors"})
    assert f"{base / 'tokenizer'}: is a symlink to /etc, outside the base" in got
    (base / "tokenizer").unlink()
    _fifo(base / "notes")
    assert "is a FIFO (named pipe); only regular files are copied" in guarded(side_files, base, {"model.safetensors"})


def test_side_files_follow_links_inside_the_base_and_into_the_hub_cache_blobs(tmp_path):
    repo = tmp_path / "models--o--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    write_file(repo / "blobs" / "w", {"x": torch.ones(1)})
    (snapshot / "model.safetensors").symlink_to("../../blobs/w")
    (snapshot / "config.json").symlink_to("../../blobs/abc")  # how huggingface_hub lays out a snapshot
    (snapshot / "sub").mkdir()
    (snapshot / "sub" / "t.txt").write_text("t")
    (snapshot / "again").symlink_to("sub")  # a folder reached twice is walked once
    (snapshot / "loop").symlink_to(".")
    found = side_files(snapshot, {"model.safetensors"})
    assert sorted(map(str, found)) == ["again/t.txt", "config.json"]


def test_copy_regular_copies_exactly_the_size_it_opened(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"x" * 3_000_000)
    assert copy_regular(src, tmp_path / "b") == 3_000_000 and (tmp_path / "b").read_bytes() == src.read_bytes()
    with pytest.raises(FileExistsError):
        copy_regular(src, tmp_path / "b")


def test_tree_files_skips_weights_whatever_they_are(tmp_path):
    _fifo(tmp_path / "pytorch_model.bin")
    (tmp_path / "a.txt").write_text("a")
    assert tree_files(tmp_path, ["pytorch_model.bin", "a.txt"], roots=[tmp_path.resolve()], skip=lambda p: p.suffix == ".bin") == [
        Path("a.txt")
    ]
