"""Which format a path holds, read into a :class:`~loratools.adapter.RawAdapter`; and which writer an output gets.

Reading recognises, in this order: pickles (refused, never opened), LyCORIS
LoHa/LoKr/Tucker LoCon files (read as exact LoRA), mlx-lm files (``lora_a``/``lora_b``, their
config beside them), Flux.1 and SD3 original, kohya and XLabs layouts (fused projections split:
:mod:`.fusion`), kohya files (``lora_down``/``lora_up``), diffusers files (no PEFT config,
diffusers key layouts) and PEFT's own layout.  Writers are one function per output format in :data:`WRITERS`.
Local files only: ``hf://`` references are fetched before they get here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import spec
from ..adapter import Adapter, RawAdapter
from ..errors import FormatError, SpecError
from ..io.files import require_file_or_dir
from ..io.tensorfile import Header, read_header
from . import diffusers, gguf, kohya, lycoris, mlx, peft
from .flux import FLUX
from .fusion import Architecture
from .sd3 import SD3

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Model families whose original layouts fuse projections diffusers keeps apart (formats/fusion.py).
ARCHITECTURES: tuple[Architecture, ...] = (FLUX, SD3)


def _write_kohya(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """kohya output: Flux/SD3 modules fused back onto the original layers kohya names (``lora_unet_double_blocks_0_img_attn_qkv``)."""
    for arch in ARCHITECTURES:
        if arch.owns(adapter):
            adapter = arch.to_original(adapter)
    return kohya.write(adapter, path, force=force)


WRITERS: dict[spec.Format, Callable[..., Path]] = {
    "peft": peft.write,
    "kohya": _write_kohya,
    "diffusers": diffusers.write,
    "gguf": gguf.write,
    "mlx": mlx.write,
}


def read_raw(path: str | Path, *, base: str | Path | None = None) -> RawAdapter:
    """Read the adapter at local ``path``: a PEFT directory, a bare ``.safetensors`` file, a kohya or diffusers file.

    ``base`` (a checkpoint) is only used to map kohya's flattened module names onto module paths.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError("no such file or directory", path=path)
    require_file_or_dir(path)  # a FIFO or device: refused before anything opens it
    if path.is_dir():
        return _read_dir(path, base)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refused(path)
    header = read_header(path)
    if lycoris.is_lycoris(header.tensors):
        return lycoris.read(header, base=base)
    config_path = path.parent / spec.CONFIG_NAME
    if mlx.is_mlx(header.tensors):
        return mlx.read(header, config_path)
    foreign = _read_foreign(header, base, has_config=peft.has_config(header, config_path))
    if foreign is not None:
        return foreign
    return peft.read(str(path), header, config_path, directory=False)


def source_format(adapter: Adapter) -> spec.Format:
    """The format to write ``adapter`` back in: the one it was read from (kohya, diffusers, mlx), else ``peft``."""
    source = adapter.metadata.get(spec.META_SOURCE)
    return source if source in ("kohya", "diffusers", "mlx") else "peft"  # type: ignore[return-value]


def writer(to: str) -> Callable[..., Path]:
    """The writer for output format ``to``; :class:`SpecError` naming the choices for an unknown one."""
    if to not in WRITERS:
        raise SpecError(f"unknown output format {to!r}; choose one of {', '.join(spec.FORMATS)}")
    return WRITERS[to]  # type: ignore[index]


def _read_dir(path: Path, base: str | Path | None) -> RawAdapter:
    weights = path / spec.WEIGHTS_NAME
    if not weights.exists() and (path / mlx.WEIGHTS_NAME).exists():
        return mlx.read(_header(path / mlx.WEIGHTS_NAME), path / spec.CONFIG_NAME)
    if not weights.exists() and (path / spec.DIFFUSERS_WEIGHTS_NAME).exists():
        return read_raw(path / spec.DIFFUSERS_WEIGHTS_NAME, base=base)
    if not weights.exists():
        if (path / spec.PICKLE_WEIGHTS_NAME).exists():
            raise pickle_refused(path / spec.PICKLE_WEIGHTS_NAME)
        raise SpecError(f"no {spec.WEIGHTS_NAME} in the adapter directory", path=path, code="weights-missing")
    return peft.read(str(path), _header(weights), path / spec.CONFIG_NAME, directory=True)


def _header(weights: Path) -> Header:
    """The weights file's header, once LyCORIS layouts (a PEFT or mlx-lm directory never holds them) are refused by name."""
    header = read_header(weights)
    if lycoris.is_lycoris(header.tensors):
        raise FormatError(
            "a LyCORIS (LoHa/LoKr/Tucker LoCon) file inside an adapter directory; pass the .safetensors file itself",
            path=weights,
            code="foreign-format",
        )
    return header


def _read_foreign(header: Header, base: str | Path | None, *, has_config: bool) -> RawAdapter | None:
    """A Flux/SD3 original, kohya or XLabs file, a kohya file, or a diffusers one when no PEFT config comes with it."""
    for arch in ARCHITECTURES:
        layout = arch.detect(header.tensors)
        if layout is not None:
            return arch.read(header, layout, base=base)
    if kohya.is_kohya(header.tensors):
        return kohya.read(header, base=base)
    if not has_config and diffusers.is_diffusers(list(header.tensors)):
        return diffusers.read(header)
    return None


def pickle_refused(path: Path) -> FormatError:
    """The error for a pickle file: refused, never opened (loading one can run arbitrary code)."""
    return FormatError(
        "pickle checkpoints are refused (loading one can run arbitrary code); "
        "re-save the adapter as safetensors, e.g. PeftModel.save_pretrained(..., safe_serialization=True)",
        path=path,
        code="pickle-refused",
    )
