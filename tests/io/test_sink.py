import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.io.sink import ALIGN, Sink


def _placed(data: bytes, offset: int, congruent: bool) -> torch.Tensor:
    """``data`` in a fresh buffer, at an address ≡ ``offset`` mod ALIGN when ``congruent``, else one byte off."""
    buf = torch.empty(len(data) + 2 * ALIGN, dtype=torch.uint8)
    shift = (offset - buf.data_ptr()) % ALIGN + (0 if congruent else 1)
    piece = buf[shift : shift + len(data)]
    if data:
        piece.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return piece


def _write(path: Path, pieces: list[bytes], congruent: list[bool], **kwargs: bool) -> Sink:
    sink = Sink(path, **kwargs)
    offset = 0
    for data, aligned in zip(pieces, congruent, strict=True):
        sink.write(_placed(data, offset, aligned))
        offset += len(data)
    sink.close()
    return sink


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * ALIGN + 17), min_size=0, max_size=8),
    congruent=st.lists(st.booleans(), min_size=8, max_size=8),
    direct=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_sequence_of_writes_gives_exactly_those_bytes(tmp_path_factory, sizes, congruent, direct, seed) -> None:
    """Carried partial blocks, zero-copy blocks and bounced blocks reassemble the stream byte for byte."""
    gen = torch.Generator().manual_seed(seed)
    pieces = [bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).tolist()) for n in sizes]
    path = tmp_path_factory.mktemp("sink") / "out.bin"
    sink = _write(path, pieces, congruent[: len(pieces)], direct=direct)
    assert path.read_bytes() == b"".join(pieces)
    assert sink.size == sum(sizes)


def test_data_placed_like_its_offset_is_written_without_a_bounce_copy(tmp_path: Path) -> None:
    pieces = [b"h" * 100, b"a" * (5 * ALIGN + 3), b"b" * (2 * ALIGN), b"c" * 7]
    sink = _write(tmp_path / "zero-copy", pieces, [True] * 4)
    assert sink._stage is None  # no bounce buffer was ever needed
    sink = _write(tmp_path / "bounced", pieces, [False] * 4)
    assert (tmp_path / "bounced").read_bytes() == (tmp_path / "zero-copy").read_bytes() == b"".join(pieces)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_file_system_refusing_o_direct_at_open_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    sink = _write(tmp_path / "out", [b"x" * (ALIGN + 5), b"y" * 3], [True, True])
    assert not sink.direct
    assert (tmp_path / "out").read_bytes() == b"x" * (ALIGN + 5) + b"y" * 3


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_file_system_refusing_o_direct_at_write_falls_back_mid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    refused = []

    def no_direct(fd, data, offset):  # type: ignore[no-untyped-def]
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", no_direct)
    pieces = [b"a" * 10, b"b" * (3 * ALIGN), b"c" * 5]
    sink = Sink(tmp_path / "out")
    if not sink.direct:
        pytest.skip("this file system refuses O_DIRECT at open already")
    offset = 0
    for data in pieces:
        sink.write(_placed(data, offset, True))
        offset += len(data)
    sink.close()
    assert refused == [0]  # refused once, then the descriptor was switched to buffered writes
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_fsync_and_permissions_like_a_plain_create(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        _write(tmp_path / "out", [b"q" * 9], [True], fsync=True)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").read_bytes() == b"q" * 9
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o644


def _fill_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    monkeypatch.setattr(os, "write", disk_full)


@pytest.mark.parametrize("congruent", [True, False])
def test_a_failing_write_reports_the_os_error_and_abort_closes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, congruent: bool) -> None:
    """A disk-full error reaches the caller as itself (zero-copy, carried or bounced), not as an error
    about buffers still in use, when abort runs while it is in flight (as the streaming layer does)
    and when close hits it."""
    sink = Sink(tmp_path / "in-flight")
    _fill_disk(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        try:
            sink.write(_placed(b"z" * 100, 0, congruent))
            sink.write(_placed(b"y" * (3 * ALIGN), 100, congruent))
        except OSError:
            sink.abort()
            raise
    assert sink._fd == -1
    monkeypatch.undo()
    sink = Sink(tmp_path / "at-close")
    sink.write(_placed(b"z" * 100, 0, congruent))
    _fill_disk(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert sink._fd == -1
