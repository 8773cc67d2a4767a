"""Atomic outputs: build in a temporary sibling, rename into place only when complete.

A failure, Ctrl-C or SIGTERM part-way leaves neither a partial output nor the temporary: the
context manager removes it on any exception (``KeyboardInterrupt`` and ``SystemExit`` included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError

TEMP_PREFIX = ".loratools-tmp-"


def check_output(path: str | Path, *, force: bool) -> Path:
    """Refuse an existing ``path`` unless ``force``; returns it as a ``Path``."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError("output already exists; pass --force (force=True) to replace it", path=path)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _default_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the output the permissions a plain create would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path`` atomically.

    ``directory`` chooses whether the temporary is an (empty) directory or a file path.  An existing
    ``path`` is refused unless ``force``; with ``force`` it is replaced only after the new output is
    complete.
    """
    path = check_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    _default_permissions(tmp)
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            trash = path.with_name(f"{TEMP_PREFIX}old-{path.name}-{os.getpid()}")
            os.replace(path, trash)
            os.replace(tmp, path)
            _remove(trash)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
