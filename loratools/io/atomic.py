"""Atomic outputs: build in a temporary sibling, put it in place only when complete, never over what we did not create.

A failure, Ctrl-C or SIGTERM part-way leaves neither a partial output nor the temporary: the
context manager removes it on any exception (``KeyboardInterrupt`` and ``SystemExit`` included).

The final step never replaces an output it did not create.  Without ``force`` it is a no-replace
rename (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a hard link for a file, a plain rename for
a directory, which POSIX never lets replace a non-empty one), so of two writers racing for one
path exactly one wins and the other fails with :class:`OutputExistsError`.  With ``force`` the
old output is exchanged with the new one in one step (``RENAME_EXCHANGE``) and then removed;
where that is not available the old output is moved aside, the new one put in place, and the old
one moved back if that fails.  SIGINT/SIGTERM are held during these few system calls.

Temporaries are named after their owner (host, boot, pid and the process's start time), so a later
output into the same folder removes those of processes that no longer run (a ``kill -9``, a power
cut) and never those of a live one, and puts back an old output a dead ``force`` had moved aside.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import OutputExistsError

TEMP_PREFIX = ".loratools-tmp-"
# .loratools-tmp-<host>-<boot>-<pid>-<start>-<new|old>-<random>[-<output name>]
_NAME = re.compile(
    re.escape(TEMP_PREFIX)
    + r"(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-(?P<role>new|old)-[0-9a-f]{8}(?:-(?P<target>.+))?"
)
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_EXISTS = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _load_renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


@dataclass(frozen=True)
class Owner:
    """Who made a temporary: a hash of host name and pid namespace, the boot, the pid and its start time.

    ``start`` is the process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    so a pid reused by another process is not mistaken for the owner; ``0`` where it is unknown
    (not Linux), where only whether the pid runs is checked.
    """

    host: str
    boot: str
    pid: int
    start: int

    @property
    def tag(self) -> str:
        return f"{self.host}-{self.boot}-{self.pid}-{self.start}"

    def alive(self) -> bool:
        """Whether the owning process still runs; only meaningful for owners on this host."""
        if self.boot != _boot():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # runs, as another user
        if self.start == 0:
            return True
        state, start = _proc_stat(self.pid)
        return state != "Z" and start in (0, self.start)  # a zombie has exited; another start, another process


def _proc_stat(pid: int) -> tuple[str, int]:
    """State letter and start time (clock ticks since boot) of ``pid`` from ``/proc``; ``("", 0)`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of the line
    except (OSError, IndexError, ValueError):
        return "", 0


def _start_time(pid: int) -> int:
    return _proc_stat(pid)[1]


@cache
def _boot() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().replace("-", "")[:8].lower()
    except OSError:
        return "0" * 8


@cache
def _host() -> str:
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)  # containers sharing a folder see other pids
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def me() -> Owner:
    """The current process as an :class:`Owner` (recomputed after a fork)."""
    return Owner(_host(), _boot(), os.getpid(), _start_time(os.getpid()))


def temp_name(owner: Owner, role: str, target: str | None = None) -> str:
    """A temporary's name: ``new`` for an output being built, ``old`` (with its ``target`` name) for one moved aside."""
    name = f"{TEMP_PREFIX}{owner.tag}-{role}-{secrets.token_hex(4)}"
    return f"{name}-{target}" if target is not None else name


def check_output(path: str | Path, *, force: bool) -> Path:
    """Refuse an existing ``path`` unless ``force``; returns it as a ``Path``."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise _exists(path)
    return path


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError("output already exists; pass --force (force=True) to replace it", path=path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep(folder: Path) -> None:
    """Remove the temporaries in ``folder`` left by dead processes of this host; restore moved-aside outputs.

    A temporary of a live process, of another host or container, or not named by us is left alone.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None or match["host"] != _host():
            continue
        if Owner(match["host"], match["boot"], int(match["pid"]), int(match["start"])).alive():
            continue
        path, target = folder / entry.name, match["target"]
        if match["role"] == "old" and target and not ((folder / target).exists() or (folder / target).is_symlink()):
            with contextlib.suppress(OSError):  # another sweeper may restore it first; else a later run retries
                _place(path, folder / target, directory=path.is_dir())
            continue
        with contextlib.suppress(OSError):
            _remove(path)


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; ``False`` where this kernel, C library or file system lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:  # type: ignore[operator]
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _place(src: Path, dst: Path, *, directory: bool) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (:class:`OutputExistsError` then)."""
    try:
        if _rename2(src, dst, _RENAME_NOREPLACE):
            return
        if not directory:
            try:
                os.link(src, dst)  # fails with EEXIST rather than replacing
            except OSError as err:
                if err.errno not in _NO_LINKS:
                    raise
                # no hard links here (some FUSE, FAT): a check then a rename, racy but the best left
                if dst.exists() or dst.is_symlink():
                    raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
                os.rename(src, dst)
            else:
                os.unlink(src)
            return
        os.rename(src, dst)  # POSIX: a directory replaces only an empty directory; Windows: never replaces
    except OSError as err:
        if err.errno in _EXISTS or isinstance(err, FileExistsError):
            raise _exists(dst) from None
        raise


def _replace(src: Path, dst: Path, *, directory: bool) -> None:
    """Put ``src`` in place of ``dst`` (existing or not); an old ``dst`` is removed only once ``src`` is in place."""
    for _ in range(3):  # dst may appear or vanish between tries (another writer)
        if not (dst.exists() or dst.is_symlink()):
            with contextlib.suppress(OutputExistsError):
                _place(src, dst, directory=directory)
                return
            continue
        try:
            if _rename2(src, dst, _RENAME_EXCHANGE):
                _remove(src)  # src now holds the old output
                return
        except FileNotFoundError:
            if not src.exists():
                raise
            continue
        aside = dst.with_name(temp_name(me(), "old", dst.name))
        try:
            os.rename(dst, aside)
        except FileNotFoundError:
            continue
        try:
            _place(src, dst, directory=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                _place(aside, dst, directory=aside.is_dir())
            raise
        _remove(aside)
        return
    raise _exists(dst)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (delivered on exit) so a Ctrl-C cannot land between two renames."""
    held: list[int] = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def _create(parent: Path, *, directory: bool) -> Path:
    """A new, empty temporary in ``parent`` with the permissions a plain create would give (umask applied)."""
    tmp = parent / temp_name(me(), "new")
    if directory:
        os.mkdir(tmp, 0o777)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


@contextlib.contextmanager
def atomic_output(path: str | Path, *, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it is put in place at ``path``.

    ``directory`` chooses whether the temporary is an (empty) directory or an (empty) file.  An
    existing ``path`` is refused unless ``force``, both now and at the end (another process may have
    created it meanwhile); with ``force`` it is replaced only once the new output is complete.
    Temporaries of dead processes beside ``path`` are removed first.
    """
    path = Path(path)
    if path.parent.is_dir():
        sweep(path.parent)  # first: it may put back an output a dead process had moved aside
    check_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create(path.parent, directory=directory)
    try:
        yield tmp
        with _signals_held():
            if force:
                _replace(tmp, path, directory=directory)
            else:
                _place(tmp, path, directory=directory)
    except BaseException:
        _remove(tmp)
        raise
