"""Compiled loops kept as machine code and loaded without numba's runtime.

Calling a numba-compiled loop costs each process about 0.85 s before the first call returns, even
when the loop comes from numba's disk cache: numba's import, then its typing and lowering registries
(most of numba, and scipy where it is installed), which a cached loop does not need.  An FP8 merge's
first row block waited for that.  So each entry point of a loop module is also compiled, once, as a
C-callable function (``numba.cfunc``) taking pointers and sizes, and its object code is saved as an
*image*; a later process links it with llvmlite's MCJIT (the LLVM binding numba itself uses: about
0.1 s, no numba import) and calls it through ctypes, which releases the GIL for the call, so pool
threads run side by side as before.  The code is numba's, compiled from the same loops with the same
flags into one module, in strict IEEE arithmetic: the same bytes (tests/fused/test_native.py compares them).

What the code may import (read from the object's own symbol table, :mod:`loratools.fused.elf`): the
process's symbols (Python's C API, libc, libm) and a few of numba's runtime, defined in each engine by
:data:`_STUBS`: the GIL helpers of a C-callable function's error path, and the raise and free paths,
which are never reached: the entry points allocate nothing (every array is a view of the caller's
memory; :func:`build` refuses any other runtime symbol, and code holding this process's addresses)
and are passed only positive sizes, so no loop has an empty step.  Objects are ELF (Linux); elsewhere
the loops run through numba.  An image is keyed by the loop sources, the numba and llvmlite versions and this CPU (name
and features); each object is checked against its SHA-256 before it is linked, and every symbol it
imports must resolve first.  Anything stale, corrupt or unresolvable is skipped, and the loops run
through numba, which builds the image for the next process.  Like numba's cache and Python's
``__pycache__``, an image is trusted code: it is written in the package's ``__pycache__`` or, where
that is not writable, the user's cache directory (``LORATOOLS_CACHE_DIR`` overrides both).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import elf

FORMAT = 1  # the image layout below: a folder of <entry>.o files and manifest.json
_MANIFEST_MAX = 1 << 20  # bytes: a manifest is read up to this size
_UNREACHABLE = ("NRT_MemInfo_call_dtor", "NRT_Free", "numba_do_raise", "numba_runtime_build_excinfo_struct", "numba_unpickle")
_MESSAGE = b"loratools: a compiled loop raised an exception or freed an array, which its entry points never do"
_STUBS = f"""
@message = private constant [{len(_MESSAGE) + 1} x i8] c"{_MESSAGE.decode()}\\00"
declare i32 @PyGILState_Ensure()
declare void @PyGILState_Release(i32)
declare void @Py_FatalError(ptr)

define void @numba_gil_ensure(ptr %state) {{
  %s = call i32 @PyGILState_Ensure()
  store i32 %s, ptr %state
  ret void
}}

define void @numba_gil_release(ptr %state) {{
  %s = load i32, ptr %state
  call void @PyGILState_Release(i32 %s)
  ret void
}}
""" + "".join(f"\ndefine void @{name}() {{\n  call void @Py_FatalError(ptr @message)\n  unreachable\n}}\n" for name in _UNREACHABLE)
"""numba's runtime as the entry points' code may import it: the GIL helpers, and the raise and free paths, which
are unreachable (nothing is allocated, and :meth:`Entry.marshal` passes only positive sizes, so no ``range`` has
a zero step); if one were reached, the process stops with a message, never a wrong result."""
_STUBBED = frozenset({"numba_gil_ensure", "numba_gil_release", *_UNREACHABLE})


class ImageError(Exception):
    """An image that cannot be built, read or linked here (internal: :class:`Loops` then runs the loops through numba)."""


class _Corrupt(ImageError):
    """A saved image that is not whole (a digest differs, a file or an entry is missing): removed and built again."""


@dataclass(frozen=True)
class Array:
    """A C-contiguous, aligned array argument: passed as its data pointer followed by its ``ndim`` sizes (int64).
    ``writes``: the loop writes it, so it must be writeable (numba's dispatch refuses a read-only one too)."""

    dtype: str  # numpy's name: "uint8", "int32", "int64", "float32", "float64"
    ndim: int
    writes: bool = False


@dataclass(frozen=True)
class Int:
    """A positive int64 argument: a size or a step of the loops."""


INT = Int()


@dataclass(frozen=True)
class Group:
    """Arguments the loop takes as one tuple (the low-rank terms' arrays), passed one after the other."""

    arrays: tuple[Array | Int, ...]


Arg = Array | Int | Group


@dataclass(frozen=True)
class Entry:
    """An entry point of a loop module: its name there and its arguments in order (:class:`Array`, :class:`Group`
    or :data:`INT`)."""

    name: str
    args: tuple[Arg, ...]

    def ctypes_args(self) -> list[Any]:
        """The C function's parameter types, in :meth:`marshal`'s order."""
        out: list[Any] = []
        for a in _flat_args(self.args):
            out += [ctypes.c_int64] if isinstance(a, Int) else [ctypes.c_void_p] + [ctypes.c_int64] * a.ndim
        return out

    def marshal(self, values: tuple[Any, ...]) -> list[int]:
        """The C arguments for ``values``; an array of another dtype, rank or layout is a TypeError (the code
        would read it as its declared type)."""
        if len(values) != len(self.args):
            raise TypeError(f"{self.name} takes {len(self.args)} arguments, got {len(values)}")
        out: list[int] = []
        for i, (a, v) in enumerate(zip(self.args, values, strict=True)):
            if isinstance(a, Group):
                if not isinstance(v, tuple) or len(v) != len(a.arrays):
                    raise TypeError(f"{self.name} argument {i}: expected a tuple of {len(a.arrays)}")
                out += Entry(f"{self.name} argument {i}", a.arrays).marshal(v)
                continue
            if isinstance(a, Int):
                if int(v) < 1:
                    raise ValueError(f"{self.name} argument {i}: a size must be positive, got {v}")
                out.append(int(v))
                continue
            if not isinstance(v, np.ndarray) or v.dtype != a.dtype or v.ndim != a.ndim or not (v.flags.c_contiguous and v.flags.aligned):
                got = f"{v.dtype} {v.ndim}-D" if isinstance(v, np.ndarray) else type(v).__name__
                raise TypeError(f"{self.name} argument {i}: expected a C-contiguous {a.dtype} {a.ndim}-D array, got {got}")
            if a.writes and not v.flags.writeable:
                raise TypeError(f"{self.name} argument {i}: the loop writes it, but the array is read-only")
            out.append(v.ctypes.data)
            out += v.shape
        return out

    def source(self) -> str:
        """The C-callable function's Python source: each array rebuilt from its pointer and sizes, then the loop."""
        params: list[str] = []

        def view(name: str, a: Array | Int) -> str:
            if isinstance(a, Int):
                params.append(name)
                return name
            sizes = [f"{name}_{d}" for d in range(a.ndim)]
            params.extend([name, *sizes])
            return f"carray({name}, ({', '.join(sizes)},))"

        views = [
            f"({''.join(view(f'a{i}_{j}', b) + ', ' for j, b in enumerate(a.arrays))})" if isinstance(a, Group) else view(f"a{i}", a)
            for i, a in enumerate(self.args)
        ]
        return f"def entry({', '.join(params)}):\n    loop({', '.join(views)})\n"


def _flat_args(args: tuple[Arg, ...]) -> list[Array | Int]:
    """The arguments with each group's spelled out, as the C function takes them."""
    return [b for a in args for b in (a.arrays if isinstance(a, Group) else (a,))]


@dataclass(frozen=True)
class Compiled:
    """One entry point's object code, the symbol to call and the symbols it imports."""

    symbol: str
    code: bytes
    imports: tuple[str, ...]


def image_key(module: str, entries: tuple[Entry, ...]) -> str:
    """What an image is valid for: the sources of the loop module, of the compilation rules (``jit.py``) and of
    this module, the entry points, the numba and llvmlite versions, the Python version and this CPU (numba
    compiles for the host, or for ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``)."""
    import llvmlite.binding as ll

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module {module}")
    h = hashlib.sha256(f"{FORMAT} {module} {entries!r} {sys.version} {sys.platform}".encode())
    for path in (Path(spec.origin), Path(__file__).with_name("jit.py"), Path(__file__)):
        h.update(path.name.encode() + path.read_bytes())
    for dist in ("numba", "llvmlite"):
        h.update(importlib.metadata.version(dist).encode())
    chosen = (os.environ.get("NUMBA_CPU_NAME", ""), os.environ.get("NUMBA_CPU_FEATURES", ""))
    h.update(repr((ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten(), chosen)).encode())
    return f"{module.rsplit('.', 1)[-1]}-{h.hexdigest()[:24]}"


def directories() -> list[Path]:
    """Where images are looked for, in order, and the first writable one is where they are saved."""
    own = os.environ.get("LORATOOLS_CACHE_DIR")
    if own:
        return [Path(own) / "fused"]
    found = [Path(__file__).parent / "__pycache__"]
    try:
        found.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loratools" / "fused")
    except (RuntimeError, KeyError):  # no home directory (a container running as a user with no passwd entry)
        pass
    return found


def _writable(candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` that exists or can be made and is writable."""
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK | os.X_OK):
            return d
    return None


def build(module: ModuleType, entries: tuple[Entry, ...]) -> dict[str, Compiled]:
    """Each entry point of ``module`` compiled by numba as a C-callable function, its object code and imports."""
    import numba
    from numba import types

    out: dict[str, Compiled] = {}
    for e in entries:
        namespace: dict[str, Any] = {"carray": numba.carray, "loop": getattr(module, e.name)}
        exec(compile(e.source(), f"<loratools.fused.native {e.name}>", "exec"), namespace)  # noqa: S102 - our own text
        sig: list[Any] = []
        for a in _flat_args(e.args):
            sig += [types.int64] if isinstance(a, Int) else [types.CPointer(numba.from_dtype(np.dtype(a.dtype)))] + [types.int64] * a.ndim
        options: dict[str, Any] = {"nopython": True, "error_model": "numpy", "boundscheck": False}
        fn = numba.cfunc(types.void(*sig), **options)(namespace["entry"])
        library: Any = fn._library  # type: ignore[attr-defined]  # numba keeps it private; its object code is saved
        where = f"{module.__name__}.{e.name}"
        if getattr(library, "has_dynamic_globals", True):  # numba's own cache refuses these too
            raise ImageError(f"{where} holds addresses of this process (or numba no longer says whether it does)")
        _, kind, payload = library.serialize_using_object_code()
        code = payload[0] if kind == "object" and isinstance(payload, tuple) and payload else None
        if not isinstance(code, bytes):
            raise ImageError(f"numba gave {kind!r} code for {where}, not object code")
        try:
            imports = elf.imports(code)
        except ValueError as err:
            raise ImageError(f"{where}: {err}") from None
        runtime = [s for s in imports if s.startswith(("NRT_", "numba_")) and s not in _STUBBED]
        if runtime:
            raise ImageError(f"{where} needs numba's runtime ({', '.join(runtime)}): an entry point must not allocate")
        out[e.name] = Compiled(fn.native_name, code, imports)
    return out


def save(directory: Path, key: str, image: dict[str, Compiled], entries: tuple[Entry, ...]) -> Path:
    """Write ``image`` as ``directory/key`` (a folder), atomically: a concurrent writer's whole copy is kept, a
    broken one (left by a process killed while it removed one) replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory))
    try:
        listed: dict[str, Any] = {}
        for name, c in image.items():
            (tmp / f"{name}.o").write_bytes(c.code)
            listed[name] = {"symbol": c.symbol, "sha256": hashlib.sha256(c.code).hexdigest(), "imports": list(c.imports)}
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "key": key, "entries": listed}, indent=1))
        for attempt in range(2):
            try:
                os.rename(tmp, final)
                break
            except OSError:
                try:
                    read(final, key, entries)
                    break  # another process saved it first
                except _Corrupt:
                    if attempt:
                        raise
                    aside = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory))
                    os.replace(final, aside / "old")
                    shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read(folder: Path, key: str, entries: tuple[Entry, ...]) -> dict[str, Compiled]:
    """The image in ``folder`` for ``key``, each object checked against its digest; :class:`ImageError` when it cannot
    be read now, its subclass ``_Corrupt`` when it is not a whole image."""
    try:
        with open(folder / "manifest.json", "rb") as fh:
            manifest = json.loads(fh.read(_MANIFEST_MAX + 1))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise _Corrupt(f"{folder}: not an image for {key}")
        out: dict[str, Compiled] = {}
        for e in entries:
            meta = manifest["entries"][e.name]
            code = (folder / f"{e.name}.o").read_bytes()
            if hashlib.sha256(code).hexdigest() != meta["sha256"]:
                raise _Corrupt(f"{folder / (e.name + '.o')}: its SHA-256 is not the manifest's")
            out[e.name] = Compiled(str(meta["symbol"]), code, tuple(str(s) for s in meta["imports"]))
        return out
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise _Corrupt(f"{folder}: {err}") from None
    except OSError as err:  # permissions, too many open files: the image may be whole
        raise ImageError(f"{folder}: {err}") from None


class _Linked:
    """An image linked into this process: one MCJIT engine per entry point (each object carries its own copies of
    the loops it calls, so they cannot share one), kept alive as long as the functions are."""

    def __init__(self, entries: tuple[Entry, ...], image: dict[str, Compiled]):
        try:
            self._link(entries, image)
        except RuntimeError as err:  # llvmlite's: the stubs do not parse (an LLVM older than 15) or an object is refused
            raise ImageError(f"cannot link the image: {err}") from None

    def _link(self, entries: tuple[Entry, ...], image: dict[str, Compiled]) -> None:
        import llvmlite.binding as ll

        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        target = ll.Target.from_default_triple()
        self.engines: list[Any] = []
        self.functions: dict[str, Callable[..., None]] = {}
        for e in entries:
            c = image[e.name]
            # An engine owns its target machine, so each gets one; creating it opens the process's symbols too.
            engine = ll.create_mcjit_compiler(ll.parse_assembly(_STUBS), target.create_target_machine())
            missing = [s for s in c.imports if s not in _STUBBED and not ll.address_of_symbol(s)]
            if missing:  # checked first: MCJIT aborts the process on a symbol it cannot resolve
                raise ImageError(f"{e.name} imports {', '.join(missing)}, which this process does not have")
            engine.add_object_file(ll.ObjectFileRef.from_data(c.code))
            engine.finalize_object()
            address = engine.get_function_address(c.symbol)
            if not address:
                raise ImageError(f"{e.name}: its object code defines no {c.symbol}")
            self.engines.append(engine)
            self.functions[e.name] = _caller(e, ctypes.CFUNCTYPE(None, *e.ctypes_args())(address))


def _caller(entry: Entry, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` (the C function) called with numpy arrays, checked and marshalled by ``entry``."""

    def call(*values: Any) -> None:
        fn(*entry.marshal(values))

    return call


class Loops:
    """A loop module's entry points, called by name: from an image where one is cached (or can be built), else
    through numba.  The first :meth:`call` (or :meth:`load`, or :meth:`start` in the background) resolves them, once."""

    def __init__(self, module: str, entries: tuple[Entry, ...], *, image: bool = True):
        self.module, self.entries, self.image = module, entries, image
        self._lock = threading.Lock()
        self._functions: dict[str, Callable[..., None]] | None = None
        self._linked: _Linked | None = None
        self.thread: threading.Thread | None = None  # the background load :meth:`start` began
        self.backend = ""  # "image" or "numba", once loaded
        self.why_numba = ""  # why no image could be used, when the loops run through numba

    def call(self, name: str, *values: Any) -> None:
        functions = self._functions
        if functions is None:
            functions = self.load()
        functions[name](*values)

    def start(self) -> None:
        """:meth:`load` on a background thread, started once (not a daemon: a build is never cut off midway), so a
        caller that knows it will need the loops overlaps their loading with its own work."""
        with self._lock:
            if self.thread is None and self._functions is None:
                self.thread = threading.Thread(target=self.load, name=f"loratools-load-{self.module.rsplit('.', 1)[-1]}")
                self.thread.start()

    def load(self) -> dict[str, Callable[..., None]]:
        with self._lock:
            if self._functions is None:
                self._functions = self._resolve()
            return self._functions

    def _resolve(self) -> dict[str, Callable[..., None]]:
        found = self._image() if self.image else "asked for numba"
        if isinstance(found, str):
            return self._numba(found)
        try:
            return self._link(found)
        except ImageError as err:  # this process lacks a symbol (a new build would import the same ones), or LLVM refused
            return self._numba(str(err))

    def _image(self) -> dict[str, Compiled] | str:
        """The image to link: cached, else built now (and saved); or why the loops run through numba."""
        try:
            key = image_key(self.module, self.entries)
        except (OSError, ImportError, ValueError) as err:
            return f"no image key: {err}"
        places = directories()
        for d in places:
            folder = d / key
            if folder.is_dir():
                try:
                    return read(folder, key, self.entries)
                except _Corrupt:  # ours, and not whole: built again below
                    shutil.rmtree(folder, ignore_errors=True)
                except ImageError as err:
                    return str(err)
        home = _writable(places)
        if home is None:  # every process would build it again, which costs more than numba's start
            return "no writable directory for an image"
        try:
            image = build(importlib.import_module(self.module), self.entries)
        except Exception as err:  # noqa: BLE001 - numba's internals moved: the loops still run through numba
            return f"image not built: {type(err).__name__}: {err}"
        try:
            save(home, key, image, self.entries)
        except (OSError, ImageError) as err:
            self.why_numba = f"image not saved: {err}"  # linked all the same
        return image

    def _link(self, image: dict[str, Compiled]) -> dict[str, Callable[..., None]]:
        self._linked = _Linked(self.entries, image)
        self.backend = "image"
        return self._linked.functions

    def _numba(self, why: str) -> dict[str, Callable[..., None]]:
        module = importlib.import_module(self.module)
        self.backend, self.why_numba = "numba", why
        return {e.name: getattr(module, e.name) for e in self.entries}
