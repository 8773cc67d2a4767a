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
import re
import struct
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

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
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
# Bits per element of every dtype the safetensors Rust reader knows (Dtype::bitsize, safetensors 0.8);
# the sub-byte ones (F4, F6_*) are valid in a header, but loratools reads no tensor of them.
_BITS: dict[str, int] = {**{name: 8 * size for name, size in ITEMSIZE.items()}, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

DtypeLike = spec.DtypeChoice | torch.dtype | None
"""What every writing call accepts as ``dtype``: a name from :data:`loratools.spec.DTYPE_CHOICES` or a torch dtype."""


def torch_dtype(choice: object) -> torch.dtype | None:
    """The torch dtype of a dtype choice (:func:`loratools.spec.dtype_code`); ``None`` keeps the stored one."""
    code = spec.dtype_code(choice)
    return DTYPES[code] if code is not None else None


_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in safetensors/src/tensor.rs, 0.8)
_MAX_DEPTH = 127  # serde_json's recursion limit (128) as the Rust reader applies it, measured with safetensors 0.8
_MAX_COUNT = 2**64 - 1  # usize
_SURROGATE = re.compile("[\ud800-\udfff]")
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

    Accepts exactly the headers the safetensors Rust reader (0.8, ``safetensors/src/tensor.rs``
    ``read_metadata`` / ``Metadata::validate``) accepts, so what we inspect is what PEFT loads.
    Raises :class:`FormatError` naming the file (and tensor) otherwise: a truncated file, a header
    that is not strict UTF-8 JSON, ``__metadata__`` that is not an object of strings, an unknown
    dtype, a shape whose size overflows, offsets that overlap, leave holes or run past the end.
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
    parsed, duplicated = _parse_json(path, raw)
    if "__metadata__" in duplicated.get(id(parsed), ()):
        raise FormatError("corrupt safetensors header: __metadata__ appears twice", path=path)
    metadata = _metadata(path, parsed.pop("__metadata__", None))
    data_start = 8 + length
    tensors = [_tensor_info(path, name, entry, data_start, duplicated.get(id(entry), set())) for name, entry in parsed.items()]
    tensors.sort(key=lambda t: (t.start, t.end))  # the Rust reader sorts by (begin, end) too
    expected = data_start
    for info in tensors:
        if info.start != expected:
            raise FormatError(f"tensor data offsets overlap or leave a gap at byte {info.start}", path=path, key=info.name)
        expected = info.end
    if expected != size:
        what = "is truncated" if expected > size else "has trailing bytes"
        raise FormatError(f"file {what}: tensor data ends at byte {expected}, file has {size}", path=path)
    return Header(path, {t.name: t for t in tensors}, metadata, data_start, size)


class _Refused(ValueError):
    """A JSON value the Rust reader's serde_json refuses although Python's json takes it."""


def _parse_json(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[int, set[str]]]:
    """The header object, and the keys each object (by ``id``) holds more than once.

    serde_json's rules, not Python's: strict UTF-8 (no BOM, no UTF-16/32 guessing), no NaN or
    Infinity, no number beyond a double's range, no lone surrogate escape, at most 127 levels of
    nesting.  Duplicate keys are resolved as the Rust reader does (the last one wins) by the caller.
    """
    duplicated: dict[int, set[str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            duplicated[id(obj)] = {k for k, n in Counter(k for k, _ in items).items() if n > 1}
        return obj

    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=pairs, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except UnicodeDecodeError as err:
        raise FormatError(f"corrupt safetensors header: not UTF-8 at byte {err.start} (headers are UTF-8, no BOM)", path=path) from None
    except RecursionError:
        raise FormatError(f"corrupt safetensors header: JSON nested deeper than {_MAX_DEPTH} levels", path=path) from None
    except ValueError as err:  # JSONDecodeError, _Refused, an integer of more than 4300 digits
        raise FormatError(f"corrupt safetensors header ({err})", path=path) from None
    if not isinstance(parsed, dict):
        raise FormatError("corrupt safetensors header (not a JSON object)", path=path)
    _check_tree(path, parsed)
    return parsed, duplicated


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int | float:
    value = int(text)
    if abs(value) > sys.float_info.max:
        raise _Refused(f"number {text[:20]}... is out of range")
    return -0.0 if text == "-0" else value  # serde_json reads -0 as a float, never a count


def _check_tree(path: Path, root: dict[str, Any]) -> None:
    """Refuse lone surrogates in any string and nesting deeper than serde_json's limit (127)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise FormatError(f"corrupt safetensors header: JSON nested deeper than {_MAX_DEPTH} levels", path=path)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            for text in (key, value):
                if isinstance(text, str) and _SURROGATE.search(text):
                    raise FormatError(f"corrupt safetensors header: lone surrogate escape in {_SURROGATE.sub('?', text)[:60]!r}", path=path)
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"corrupt safetensors header: __metadata__ must be an object of strings, got {spec.clip(metadata)}", path=path)
    return metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, duplicated: set[str]) -> TensorInfo:
    fields = ("dtype", "shape", "data_offsets")
    if not isinstance(entry, dict) or not set(fields) <= entry.keys():
        raise FormatError("corrupt safetensors header entry (needs dtype, shape, data_offsets)", path=path, key=name)
    if duplicated & set(fields):
        raise FormatError(f"corrupt safetensors header entry: {sorted(duplicated & set(fields))[0]} appears twice", path=path, key=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise FormatError(f"corrupt safetensors header entry: shape {spec.clip(shape)} is not a list of sizes", path=path, key=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise FormatError(f"corrupt safetensors header entry: data_offsets {spec.clip(offsets)} is not [begin, end]", path=path, key=name)
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise FormatError(f"unknown safetensors dtype {spec.clip(dtype)}", path=path, key=name)
    begin, end = offsets
    if end < begin:
        raise FormatError(f"data_offsets [{begin}, {end}] end before they begin", path=path, key=name)
    bits = 1
    for dim in (*shape, _BITS[dtype]):  # as the Rust reader: every partial product must fit 64 bits
        bits *= dim
        if bits > _MAX_COUNT:
            raise FormatError(f"shape {spec.clip(shape)} of {dtype} is too large to address (size overflows 64 bits)", path=path, key=name)
    if bits % 8 or end - begin != bits // 8:
        raise FormatError(f"{end - begin} data bytes do not hold a {dtype} tensor of shape {spec.clip(shape)}", path=path, key=name)
    if dtype not in DTYPES:
        raise FormatError(f"safetensors dtype {dtype} (sub-byte) is not one loratools reads", path=path, key=name)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    """A usize to the Rust reader: a JSON integer from 0 to 2**64 - 1 (never 4.0, -0 or true)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def load_tensors(header: Header, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``header``'s file (or just ``names``), in memory, read through safetensors (never unpickled).

    The header's sizes already match the file's, but a sparse file can claim terabytes in a few
    kilobytes of disk; such a claim is refused against the machine's memory before anything is
    allocated, and a failure of the reader itself (an mmap refused) is one line naming the file.
    """
    wanted = list(header.tensors) if names is None else list(names)
    need, limit = sum(header.tensors[n].nbytes for n in wanted), memory_bytes()
    if limit is not None and need > limit:
        raise FormatError(
            f"its tensors claim {need / 2**30:.1f} GiB, more than this machine's {limit / 2**30:.1f} GiB of memory; refusing to load them",
            path=header.path,
        )
    try:
        with safe_open(str(header.path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, RuntimeError, MemoryError) as err:  # RuntimeError: torch's allocator
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FormatError(f"cannot read the tensor data ({spec.clip(reason)[1:-1]})", path=header.path) from None


def memory_bytes() -> int | None:
    """Physical memory in bytes, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def layout_sha256(plan: Iterable[tuple[str, str, tuple[int, ...]]]) -> str:
    """SHA-256 (hex) of a file's tensor table: each tensor's name, dtype and shape, in file order.

    Stored beside the data checksum, it tells a corrupted file (same table, other bytes) from one
    another tool rewrote with the metadata copied (a new order, new shapes or new names), where the
    data checksum no longer applies.
    """
    table = [[name, dtype, list(shape)] for name, dtype, shape in plan]
    return hashlib.sha256(json.dumps(table, separators=(",", ":")).encode()).hexdigest()


def header_layout_sha256(header: Header) -> str:
    """:func:`layout_sha256` of the tensor table ``header`` describes (its tensors in file order)."""
    return layout_sha256((t.name, t.dtype, t.shape) for t in sorted(header.tensors.values(), key=lambda t: t.start))


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
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    checksum_key: str | None = None,
    layout_key: str | None = None,
) -> None:
    """Write ``tensors`` (in the given order) to ``path``.

    With ``checksum_key``, the SHA-256 of the data section is stored under that metadata key; with
    ``layout_key``, the :func:`layout_sha256` of the tensor table it was computed over.
    """
    metadata = dict(metadata or {})
    plan = [(name, _dtype_name(name, t), tuple(t.shape)) for name, t in tensors.items()]
    if checksum_key is not None:
        digest = hashlib.sha256()
        for tensor in tensors.values():
            digest.update(tensor_bytes(tensor))
        metadata[checksum_key] = digest.hexdigest()
    if layout_key is not None:
        metadata[layout_key] = layout_sha256(plan)
    with StreamWriter(path, plan, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in DTYPE_NAMES:
        raise FormatError(f"dtype {tensor.dtype} cannot be stored in safetensors", key=name)
    return DTYPE_NAMES[tensor.dtype]
