import hashlib
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from loratools.errors import FormatError
from loratools.io.tensorfile import StreamWriter, data_sha256, read_header, write_file

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
)
def test_write_file_round_trips_through_safetensors(tmp_path_factory, shapes, dtype):
    path = tmp_path_factory.mktemp("tf") / "x.safetensors"
    tensors = {f"t{i}": (torch.arange(torch.Size(s).numel()) % 7).to(dtype).reshape(s) for i, s in enumerate(shapes)}
    write_file(path, tensors, {"k": "v"}, checksum_key="sha")
    header = read_header(path)
    assert list(header.tensors) == list(tensors)
    assert header.metadata["sha"] == data_sha256(header)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["k"] == "v"
        for name, t in tensors.items():
            assert torch.equal(fh.get_tensor(name), t)


def test_reads_headers_written_by_safetensors(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file({"b": torch.ones(2, 3, dtype=torch.bfloat16), "a": torch.zeros(5)}, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.tensors["b"].shape == (2, 3) and header.tensors["b"].dtype == "BF16"
    assert header.tensors["a"].nbytes == 20
    assert header.metadata == {"format": "pt"}
    assert header.file_size == path.stat().st_size


def test_checksum_is_sha256_of_data_section(tmp_path):
    path = tmp_path / "z.safetensors"
    write_file(path, {"w": torch.tensor([1.0, 2.0])})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert data_sha256(read_header(path)) == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert (8 + n) % 8 == 0  # data section aligned


def _write_raw(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    "header,data,needle",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown safetensors dtype"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"w": {"shape": [1]}}, b"", "needs dtype"),
        ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, b"\0" * 16, "shape 4 is not a list"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, b"\0" * 16, "is not \\[begin, end\\]"),
    ],
)
def test_corrupt_files_are_refused_by_name(tmp_path, header, data, needle):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(FormatError, match=needle) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_garbage_and_short_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(FormatError, match="too short"):
        read_header(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(FormatError, match="corrupt safetensors header"):
        read_header(garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(FormatError, match="header claims"):
        read_header(huge)


def test_stream_writer_enforces_plan(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(FormatError, match="expected"):
        with StreamWriter(path, [("a", "F32", (2,))]) as w:
            w.write("a", torch.zeros(3))
    writer = StreamWriter(path, [("a", "F32", (2,)), ("b", "F16", (1,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(FormatError, match="only 1 of 2"):
        writer.close()
