"""A safetensors file with its ``__metadata__`` replaced: the tensor table and every data byte copied verbatim.

The data section is not re-encoded, so the tensors are byte-identical and every hash of them the
file records (``loratools.sha256``, kohya's ``sshs_model_hash``, ``modelspec.hash_sha256``) stays true.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from ..errors import FormatError
from .files import open_regular
from .tensorfile import Header, encode_header, read_header

_CHUNK = 8 * 1024 * 1024


def rewrite_metadata(header: Header, dst: Path, metadata: Mapping[str, str]) -> None:
    """Write ``header``'s file to ``dst`` (an existing, empty temporary) with ``metadata`` as its ``__metadata__``.

    Offsets renumbered from 0 in file order equal the originals (:func:`read_header` refused gaps and
    overlaps); the written header is read back and its tensor table compared, and a source that changed
    size meanwhile is an error rather than a short copy.
    """
    plan = [(t.name, t.dtype, t.shape) for t in header.tensors.values()]
    blob, size = encode_header(plan, metadata)
    with open_regular(header.path) as src, open(dst, "wb") as out:
        out.write(blob)
        src.seek(header.data_start)
        shutil.copyfileobj(src, out, _CHUNK)
    written = read_header(dst)
    if written.file_size - written.data_start != size or header.file_size - header.data_start != size:
        raise FormatError("the file changed while its metadata was rewritten; nothing was written", path=header.path)
    moved = {n: (t.dtype, t.shape, t.start - written.data_start) for n, t in written.tensors.items()}
    if moved != {n: (t.dtype, t.shape, t.start - header.data_start) for n, t in header.tensors.items()}:
        raise FormatError("rewritten header does not describe the same tensors; nothing was written", path=header.path)
