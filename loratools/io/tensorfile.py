"""safetensors at the byte level: header-only reads, data checksums, and a streaming writer.

We parse the header ourselves (8-byte little-endian length, then JSON) so inspecting a 140 GB
checkpoint reads a few kilobytes, and we write files ourselves so the SHA-256 of the data section
can go into the header's ``__metadata__`` and tensors can be written one at a time as they are made.
Tensor *data* is read through ``safetensors.safe_open`` (memory-mapped, never unpickled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .. import spec
from ..errors import FormatError
from .files import require_regular

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}

DtypeLike = spec.DtypeChoice | torch.dtype | None
"""What every writing call accepts as ``dtype``: a name from :data:`loratools.spec.DTYPE_CHOICES` or a torch dtype."""


def torch_dtype(choice: object) -> torch.dtype | None:
    """The torch dtype of a dtype choice (:func:`loratools.spec.dtype_code`); ``None`` keeps the stored one."""
    code = spec.dtype_code(choice)
    return DTYPES[code] if code is not None else None


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file; ``start``/``end`` are absolute byte offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """The parsed header of one safetensors file: tensors in file order, metadata, data start."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | Path) -> Header:
    """Parse and check the header of ``path`` without reading tensor data.

    Raises :class:`FormatError` naming the file for a truncated file, bad JSON, an unknown dtype,
    offsets that overlap, leave holes or run past the end of the file.
    """
    path = Path(path)
    require_regular(path)  # a FIFO or device is refused before it is opened (opening a FIFO blocks)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"not a safetensors file: only {size} bytes, too short for a header", path=path)
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise FormatError(
                f"not a safetensors file, or truncated: header claims {length} bytes but the file has {size}",
                path=path,
            )
        raw = fh.read(length)
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"corrupt safetensors header ({err})", path=path) from None
    if not isinstance(parsed, dict):
        raise FormatError("corrupt safetensors header (not a JSON object)", path=path)
    metadata = parsed.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in parsed.items()]
    tensors.sort(key=lambda t: t.start)
    expected = data_start
    for info in tensors:
        if info.start != expected:
            raise FormatError(f"tensor data offsets overlap or leave a gap at byte {info.start}", path=path, key=info.name)
        expected = info.end
    if expected != size:
        what = "truncated" if expected > size else "has trailing bytes"
        raise FormatError(f"file is {what}: tensor data ends at byte {expected}, file has {size}", path=path)
    return Header(path, {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}, data_start, size)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise FormatError("corrupt safetensors header entry (needs dtype, shape, data_offsets)", path=path, key=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise FormatError(f"corrupt safetensors header entry: shape {shape!r} is not a list of sizes", path=path, key=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"corrupt safetensors header entry: data_offsets {offsets!r} is not [begin, end]", path=path, key=name)
    if dtype not in DTYPES:
        raise FormatError(f"unknown safetensors dtype {dtype!r}", path=path, key=name)
    begin, end = offsets
    if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
        raise FormatError(f"{end - begin} data bytes do not hold a {dtype} tensor of shape {shape}", path=path, key=name)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def data_sha256(header: Header) -> str:
    """SHA-256 (hex) of the data section: every byte after the header, in file order."""
    digest = hashlib.sha256()
    with open(header.path, "rb") as fh:
        fh.seek(header.data_start)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` in C order (no copy when already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def encode_header(plan: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> tuple[bytes, int]:
    """The header bytes (length prefix included) of a file holding ``plan``'s tensors in order, and its data size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in plan:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, offset


class StreamWriter:
    """Write a safetensors file whose header is known up front, one tensor at a time.

    ``plan`` fixes every tensor's name, dtype and shape in file order, so the header is written first
    and each tensor can be dropped as soon as its bytes are on disk: memory is bounded by one tensor.
    """

    def __init__(self, path: str | Path, plan: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._plan = list(plan)
        blob, self.data_bytes = encode_header(self._plan, metadata)
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next one in the plan, with the planned dtype and shape."""
        if self._next >= len(self._plan):
            raise FormatError("more tensors written than planned", path=self.path, key=name)
        want, dtype, shape = self._plan[self._next]
        got = (name, DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
        if got != (want, dtype, tuple(shape)):
            raise FormatError(f"expected {(want, dtype, tuple(shape))} next, got {got}", path=self.path, key=name)
        self._fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        """Flush to disk; raises if fewer tensors were written than planned."""
        try:
            if self._next != len(self._plan):
                raise FormatError(f"only {self._next} of {len(self._plan)} planned tensors written", path=self.path)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def write_file(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, checksum_key: str | None = None
) -> None:
    """Write ``tensors`` (in the given order) to ``path``.

    With ``checksum_key``, the SHA-256 of the data section is stored under that metadata key.
    """
    metadata = dict(metadata or {})
    if checksum_key is not None:
        digest = hashlib.sha256()
        for tensor in tensors.values():
            digest.update(tensor_bytes(tensor))
        metadata[checksum_key] = digest.hexdigest()
    plan = [(name, _dtype_name(name, t), tuple(t.shape)) for name, t in tensors.items()]
    with StreamWriter(path, plan, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in DTYPE_NAMES:
        raise FormatError(f"dtype {tensor.dtype} cannot be stored in safetensors", key=name)
    return DTYPE_NAMES[tensor.dtype]
