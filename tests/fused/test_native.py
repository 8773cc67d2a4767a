"""Images of compiled loops: built by numba, saved, checked and linked without numba, with numba's results bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from loratools.fused import e4m3, elf, native
from loratools.fused.native import INT, Array, Entry, Group, ImageError, Loops
from loratools.io.quant.base import LowRank


@pytest.fixture(scope="module")
def image() -> Path:
    """The e4m3 image as the codec links it (built here when none is cached), and its folder."""
    e4m3.LOOPS.load()
    assert e4m3.LOOPS.backend == "image", e4m3.LOOPS.why_numba
    key = native.image_key(e4m3.LOOPS.module, e4m3.ENTRIES)
    return next(d / key for d in native.directories() if (d / key / "manifest.json").is_file())


def _run_all(seed: int, n: int, ranks: tuple[tuple[int, float], ...]) -> list[np.ndarray]:
    """Every e4m3 entry point on ragged random rows (n x 700 in 128 x 128 blocks) with low-rank terms of ``ranks``
    (rank, scale); all their outputs."""
    g = torch.Generator().manual_seed(seed)
    k, bm, bn = 700, 128, 128
    grid = (-(-n // bm), -(-k // bn))
    q = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    q[(q & 0x7F) == 0x7F] = 1
    old = torch.rand(grid, generator=g) * 1e-2
    terms = LowRank(tuple((torch.randn(n, r, generator=g), torch.randn(r, k, generator=g), s) for r, s in ranks)).packed()
    qn, oldn = q.numpy(), old.numpy()
    out, inv = np.empty((n, k), np.uint8), np.empty(grid, np.float32)
    norms = e4m3.merge_requantize(qn, oldn, terms, bm, bn, out, inv)
    x, amax = np.empty((n, k), np.float32), np.zeros(grid, np.int32)
    e4m3.merge(qn, oldn, terms, bm, bn, x, amax)
    base = np.empty((n, k), np.float32)
    e4m3.decode(qn, oldn, bm, bn, base)
    amax2 = np.zeros(grid, np.int32)
    e4m3.block_amax(x.view(np.int32), bm, bn, amax2)
    scale, inv2 = np.empty(grid, np.float32), np.empty(grid, np.float32)
    e4m3.scales(amax.view(np.float32), scale, inv2)
    out2 = np.empty((n, k), np.uint8)
    norms2 = e4m3.requantize(x, qn, oldn, scale, inv2, bm, bn, out2)
    return [out, inv, np.array(norms), x, amax, base, amax2, scale, inv2, out2, np.array(norms2)]


CASES = [(300, ((16, 0.3), (3, -2.0))), (301, ((16, 0.5),)), (129, ((5, 1.5),))]  # two terms; odd rows, one term (LoRA's)


def test_the_image_gives_numba_dispatch_results_bit_for_bit(image: Path, monkeypatch: pytest.MonkeyPatch):
    """All six entry points, linked from the image and through numba's dispatch: the same bytes, scales and norms,
    rows in pairs and alone, one term (the fast path) and two."""
    linked = [_run_all(i, n, ranks) for i, (n, ranks) in enumerate(CASES)]
    monkeypatch.setattr(e4m3, "LOOPS", Loops(e4m3.LOOPS.module, e4m3.ENTRIES, image=False))
    dispatched = [_run_all(i, n, ranks) for i, (n, ranks) in enumerate(CASES)]
    assert e4m3.LOOPS.backend == "numba"
    for one, other in zip(linked, dispatched, strict=True):
        for a, b in zip(one, other, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert one[2][1] > 0 and (one[0] != 0).any()


def test_a_fresh_process_links_the_image_without_importing_numba(image: Path):
    code = (
        "import sys\n"
        "from loratools.fused import e4m3\n"
        "assert 'numba' not in sys.modules and 'llvmlite' not in sys.modules\n"
        "e4m3.load()\n"
        "print(e4m3.LOOPS.backend, 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["image", "False"]


def _copy(image: Path, root: Path) -> Path:
    shutil.copytree(image, root / "fused" / image.name)
    return root / "fused" / image.name


def test_a_corrupt_object_is_refused_and_its_folder_removed(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = _copy(image, tmp_path)
    code = bytearray((copy / "merge.o").read_bytes())
    code[len(code) // 2] ^= 0xFF
    (copy / "merge.o").write_bytes(bytes(code))
    with pytest.raises(ImageError, match="merge.o: its SHA-256 is not the manifest's"):
        native.read(copy, image.name, e4m3.ENTRIES)
    monkeypatch.setenv("LORATOOLS_CACHE_DIR", str(tmp_path))

    def no_numba(module: object, entries: object) -> dict:
        raise RuntimeError("numba moved")

    monkeypatch.setattr(native, "build", no_numba)
    loops = Loops(e4m3.LOOPS.module, e4m3.ENTRIES)
    loops.load()
    assert not copy.exists()  # removed, to be built again
    assert loops.backend == "numba" and loops.why_numba == "image not built: RuntimeError: numba moved"


def test_a_cached_image_is_linked_without_building(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _copy(image, tmp_path)
    monkeypatch.setenv("LORATOOLS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "build", None)  # calling it would fail the test
    loops = Loops(e4m3.LOOPS.module, e4m3.ENTRIES)
    scale, inv = np.empty((1, 2), np.float32), np.empty((1, 2), np.float32)
    loops.call("scales", np.array([[448.0, 0.0]], np.float32), scale, inv)
    assert loops.backend == "image" and scale.tolist() == [[1.0, 1.0]] and inv.tolist() == [[1.0, 1.0]]


def test_an_import_this_process_lacks_falls_back_to_numba(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Checked before linking (MCJIT would abort the process on an unresolved symbol); no rebuild is attempted."""
    copy = _copy(image, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["entries"]["decode"]["imports"].append("loratools_no_such_symbol")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("LORATOOLS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "build", None)
    loops = Loops(e4m3.LOOPS.module, e4m3.ENTRIES)
    loops.load()
    assert loops.backend == "numba" and loops.why_numba == "decode imports loratools_no_such_symbol, which this process does not have"
    assert copy.exists()


def test_the_key_follows_the_cpu_numba_compiles_for(monkeypatch: pytest.MonkeyPatch):
    key = native.image_key(e4m3.LOOPS.module, e4m3.ENTRIES)
    assert key.startswith("e4m3_loops-") and key == native.image_key(e4m3.LOOPS.module, e4m3.ENTRIES)
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert native.image_key(e4m3.LOOPS.module, e4m3.ENTRIES) != key


@numba.njit(cache=False)
def allocates(out: np.ndarray) -> None:
    out[:] = np.zeros(out.size)


def test_build_refuses_an_entry_point_that_allocates():
    runtime = r"\(NRT_Allocate, NRT_MemInfo_alloc, NRT_MemInfo_alloc_aligned\)"
    with pytest.raises(ImageError, match=rf"allocates needs numba's runtime {runtime}: an entry point must not allocate"):
        native.build(sys.modules[__name__], (Entry("allocates", (Array("float64", 1),)),))


def test_arguments_are_checked_before_the_call():
    entry = Entry("f", (Array("float32", 2), INT))
    a = np.zeros((2, 3), np.float32)
    assert entry.marshal((a, 4)) == [a.ctypes.data, 2, 3, 4]
    with pytest.raises(TypeError, match="f argument 0: expected a C-contiguous float32 2-D array, got float64 2-D"):
        entry.marshal((a.astype(np.float64), 4))
    with pytest.raises(TypeError, match="expected a C-contiguous float32 2-D array"):
        entry.marshal((a[:, ::2], 4))
    with pytest.raises(ValueError, match="f argument 1: a size must be positive, got 0"):
        entry.marshal((a, 0))
    with pytest.raises(TypeError, match="f takes 2 arguments, got 1"):
        entry.marshal((a,))
    written = Entry("w", (Array("float32", 2, writes=True),))
    frozen = a.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="w argument 0: the loop writes it, but the array is read-only"):
        written.marshal((frozen,))
    assert Entry("r", (Array("float32", 2),)).marshal((frozen,))[1:] == [2, 3]
    assert entry.source() == "def entry(a0, a0_0, a0_1, a1):\n    loop(carray(a0, (a0_0, a0_1,)), a1)\n"
    grouped = Entry("g", (Group((Array("int64", 1), INT)),))
    offsets = np.arange(3)
    assert grouped.marshal(((offsets, 7),)) == [offsets.ctypes.data, 3, 7]
    with pytest.raises(TypeError, match="g argument 0: expected a tuple of 2"):
        grouped.marshal((offsets,))
    assert grouped.source() == "def entry(a0_0, a0_0_0, a0_1):\n    loop((carray(a0_0, (a0_0_0,)), a0_1, ))\n"


def test_flat_views_refuse_a_copy():
    """An output reshaped to one row must be the same memory: a strided one is refused, not silently copied."""
    q, scale, inv = np.zeros((4, 256), np.uint8), np.ones((1, 2), np.float32), np.empty((1, 2), np.float32)
    terms = LowRank(((torch.zeros(4, 1), torch.zeros(1, 256), 1.0),)).packed()
    strided = np.zeros((4, 512), np.uint8)[:, ::2]
    with pytest.raises(TypeError, match="expected a C-contiguous array"):
        e4m3.merge_requantize(q, scale, terms, 128, 128, strided, inv)


def test_no_writable_directory_means_numba_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Building in every process would cost more than numba's start."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORATOOLS_CACHE_DIR", str(blocker))  # fused/ cannot be made under a file
    monkeypatch.setattr(native, "build", None)
    loops = Loops(e4m3.LOOPS.module, e4m3.ENTRIES)
    loops.load()
    assert loops.backend == "numba" and loops.why_numba == "no writable directory for an image"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_imports_are_the_objects_undefined_symbols(image: Path):
    """Read from the symbol table (code generation adds memset, which the LLVM module never declares), as nm -u lists."""
    for obj in sorted(image.glob("*.o")):
        listed = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
        assert elf.imports(obj.read_bytes()) == tuple(sorted({w for w in listed if w not in ("U", "w")}))
    assert "memset" in elf.imports((image / "merge.o").read_bytes())


def test_only_elf_objects_are_read():
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF object"):
        elf.imports(b"\xcf\xfa\xed\xfe" + bytes(60))  # Mach-O
    cut = bytearray(b"\x7fELF\x02\x01" + bytes(58))
    struct.pack_into("<Q", cut, 0x28, 1 << 20)  # section headers past the end
    struct.pack_into("<HH", cut, 0x3A, 64, 3)
    with pytest.raises(ValueError, match="a malformed ELF object"):
        elf.imports(bytes(cut))
