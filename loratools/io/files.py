"""Opening inputs safely: regular files only, bounded reads, and copies that stay inside their folder.

Every file loratools reads may be hostile or simply wrong.  Opening a FIFO blocks until some writer
comes (forever, for a stray ``mkfifo``), a device never ends (``/dev/zero``), and a symlink can
point anywhere (``tokenizer.json -> ~/.ssh/id_rsa`` copied into a merged model and pushed to the
Hub).  So inputs are checked with ``stat`` before they are opened (devices are never opened: some
act on open), opened non-blocking and checked again on the open descriptor (a file swapped in
between is caught), JSON is read up to a size cap, and copies take regular files from inside the
folder being copied only.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import DiskSpaceError, FormatError

MAX_JSON_BYTES = 64 * 2**20
"""The most loratools reads of one JSON file (config, index): the largest real index (~10 MB) with room to spare."""
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_COPY_CHUNK = 2**20
_O_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: ``512 B``, ``3.0 KiB``, ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: ``a FIFO``, ``a character device``, ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "a special file"


def _not_regular(path: str | Path, mode: int) -> FormatError:
    return FormatError(f"is {kind(mode)}, not a regular file; loratools reads only regular files", path=path)


def require_regular(path: str | Path) -> os.stat_result:
    """``stat`` ``path`` (following symlinks) and refuse anything but a regular file, without opening it.

    A missing file raises the usual :class:`FileNotFoundError`.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def require_file_or_dir(path: str | Path) -> os.stat_result:
    """Like :func:`require_regular`, but a directory is accepted too (model and adapter folders)."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise FormatError(f"is {kind(st.st_mode)}, not a file or directory", path=path)
    return st


def open_regular(path: str | Path) -> BinaryIO:
    """Open regular file ``path`` for binary reading; anything else is refused without blocking.

    Checked before the open (devices are never opened) and again on the descriptor, which is opened
    non-blocking (a FIFO swapped in between does not hang the open) and then made blocking again.
    """
    require_regular(path)
    fd = os.open(path, _O_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: str | Path, *, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of regular file ``path``, refused (:class:`FormatError`) beyond ``limit`` bytes.

    At most ``limit + 1`` bytes are ever read, so a file that grows while read is caught too.
    """
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise FormatError(
            f"is {human_bytes(max(size, len(data)))}, more than the {human_bytes(limit)} loratools reads of a JSON file; "
            "is it the right file?",
            path=path,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"is not UTF-8 text (byte {err.start})", path=path) from None


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path`` (resolved, symlinks followed) lies in one of the resolved ``roots``."""
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def tree_files(root: Path, names: list[str], *, roots: list[Path], skip: Callable[[Path], bool]) -> list[Path]:
    """Every file under the entries ``names`` of folder ``root``, relative to ``root``, checked safe to copy.

    Symlinks are followed only to targets inside ``roots`` (``root`` itself and, for a Hub cache
    snapshot, its blobs); a symlink leaving them, and anything that is neither a regular file nor
    a directory, is refused with :class:`FormatError` naming it (nothing is skipped silently: a
    model missing its tokenizer is worse than a refusal).  ``skip(path)`` leaves out anything but
    folders, whatever it is (weights); a folder reached twice through links is walked once.
    """
    found: list[Path] = []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    pending = [root / n for n in names]
    while pending:
        path = pending.pop(0)
        if skip(path) and not path.is_dir():
            continue
        if path.is_symlink() and not inside(path, roots):
            raise FormatError(
                f"is a symlink to {os.path.realpath(path)}, outside the base; only files inside the base are copied "
                "beside merged weights: replace the link by a copy of its target, or remove it",
                path=path,
            )
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                pending[:0] = sorted(path.iterdir())
        elif not stat.S_ISREG(st.st_mode):
            raise FormatError(f"is {kind(st.st_mode)}; only regular files are copied beside merged weights: remove it", path=path)
        else:
            found.append(path.relative_to(root))
    return found


def copy_regular(src: Path, dst: Path) -> int:
    """Copy regular file ``src`` to new file ``dst`` (mode and times too, as ``cp -p``); returns the bytes copied.

    Exactly the size ``src`` had when opened is copied: a file still growing cannot fill the disk.
    A full disk is a :class:`DiskSpaceError` naming ``dst``.
    """
    with open_regular(src) as fin:
        size = os.fstat(fin.fileno()).st_size
        try:
            with open(dst, "xb") as fout:
                left = size
                while left and (chunk := fin.read(min(_COPY_CHUNK, left))):
                    fout.write(chunk)
                    left -= len(chunk)
        except OSError as err:
            if err.errno in NO_SPACE:
                raise DiskSpaceError(f"no space left on the device ({os.strerror(err.errno)})", path=dst) from None
            raise
    if left:
        raise FormatError(f"shrank while being copied ({size - left} of {size} bytes read)", path=src)
    shutil.copystat(src, dst)
    return size
