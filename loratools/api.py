"""The checked public load and save: read any format, validate, and write any format.

:func:`load` accepts a PEFT directory, a ``.safetensors`` file (PEFT, kohya or diffusers) or
``hf://owner/name[@rev]`` or ``hf://owner/name[@rev]/file.safetensors`` (fetched into the
huggingface_hub cache first, verified; :mod:`loratools.io.hubref` has the grammar), and
raises one :class:`~loratools.errors.InvalidAdapterError` listing every error.  :func:`save` and
:func:`save_as` refuse to write anything that would not load back.  Commands that produce an
adapter write it in the format their input came in (:func:`source_format`) unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from . import metadata, spec, variants
from .adapter import Adapter, from_raw
from .errors import ArgumentError, FormatError, SpecError
from .formats import diffusers
from .formats.registry import read_raw, source_format, writer
from .io.atomic import atomic_output
from .io.files import require_regular
from .io.metafile import rewrite_metadata
from .io.remote import resolve
from .io.tensorfile import DtypeLike, read_header, torch_dtype
from .validation import check_base, check_raw, raise_errors, validate

__all__ = ["convert", "edit_metadata", "load", "save", "save_as", "save_kohya", "source_format"]


def load(path: str | Path, *, base: str | Path | None = None) -> Adapter:
    """Load and validate the adapter at ``path`` (PEFT directory, ``.safetensors``, kohya or diffusers file, ``hf://``).

    With ``base`` (a checkpoint), kohya's flattened names are mapped onto the base's module paths and
    the adapter must fit the base as the merge planner sees it.  Raises
    :class:`~loratools.errors.InvalidAdapterError` listing every error-level problem, e.g. each kohya
    name that did not map (warnings do not stop a load).  An ``hf://`` copy that is unreadable or
    invalid on its own (without ``base``, as ``pull`` checks it) is evicted from the cache before the
    error is raised, so it is fetched again next time, never reused.
    """
    local, evict = resolve(path)
    try:
        raw = read_raw(local, base=base)
        raise_errors(check_raw(raw), path=path)
    except (FormatError, SpecError):
        if evict is not None and (base is None or not validate(local).ok):  # a misfit with this base says nothing of the bytes
            evict()
        raise
    adapter = from_raw(raw)
    if base is not None:
        raise_errors(check_base(adapter, base), path=path)
    return adapter


def save(adapter: Adapter, path: str | Path, *, force: bool = False, dtype: DtypeLike = None) -> Path:
    """Write ``adapter`` to ``path`` per spec v1, atomically; returns ``path``.

    A path ending in ``.safetensors`` gets a single file with the config embedded in its metadata;
    anything else becomes a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    The checksum of the data section goes into the metadata.  An existing path needs ``force``.
    ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"`` (or the torch dtype) to cast the tensors; default keep.
    """
    return save_as(adapter, path, to="peft", force=force, dtype=dtype)


def save_as(adapter: Adapter, path: str | Path, *, to: spec.Format | None = None, force: bool = False, dtype: DtypeLike = None) -> Path:
    """Write ``adapter`` in format ``to`` (default: :func:`source_format`); atomic, refuses to overwrite without ``force``.

    ``peft`` writes spec v1 (a directory, or one file for a ``.safetensors`` path) and drops the kohya
    source marks; ``kohya`` writes one ``.safetensors`` file in kohya naming; ``diffusers`` writes
    diffusers' own layout (see :mod:`loratools.formats.diffusers`).  A PEFT output of an adapter read
    from a diffusers file names modules relative to their component (``unet``, ``text_encoder``, ...),
    as PEFT applies them to that model; several components become one PEFT adapter each, in
    subdirectories of ``path`` named after them.
    """
    fmt = to or source_format(adapter)
    write = writer(fmt)
    cast = torch_dtype(dtype)
    if cast is not None:
        adapter = adapter.with_dtype(cast)
    path = Path(path)
    if fmt != "kohya":
        _refuse_in_axis_dora(adapter, fmt, path)
    if fmt == "peft" and adapter.metadata.get(spec.META_SOURCE) == "diffusers":
        return _save_components(diffusers.components(adapter), path, force=force)
    if fmt == "peft":
        _refuse_kohya_names(adapter, path)
        raise_errors(check_raw(adapter.to_raw(str(path))), path=path)
    else:
        _refuse_variants(adapter, fmt, path)
    return write(adapter, path, force=force)


def _save_components(parts: dict[str, Adapter], path: Path, *, force: bool) -> Path:
    """One PEFT adapter per diffusers component: ``path`` itself for one, ``path/<component>/`` for several."""
    for part in parts.values():
        raise_errors(check_raw(part.to_raw(str(path))), path=path)
    if len(parts) == 1:
        return writer("peft")(next(iter(parts.values())), path, force=force)
    if path.suffix == ".safetensors":
        raise ArgumentError(
            f"the adapter holds LoRAs for {', '.join(sorted(parts))}; give a directory, which gets one PEFT adapter per component",
            path=path,
        )
    with atomic_output(path, force=force) as tmp:
        for name, part in parts.items():
            writer("peft")(part, tmp / name, force=False)
    return path


def save_kohya(adapter: Adapter, path: str | Path, *, force: bool = False, dtype: DtypeLike = None) -> Path:
    """Write ``adapter`` as a kohya ``.safetensors`` file (:func:`save_as` with ``to="kohya"``)."""
    return save_as(adapter, path, to="kohya", force=force, dtype=dtype)


def convert(src: str | Path, out: str | Path, *, to: spec.Format, base: str | Path | None = None, force: bool = False) -> Adapter:
    """Read the adapter at ``src`` (any format :func:`load` reads) and write it to ``out`` as ``to``.

    With ``base``, kohya names are mapped to the base's module paths (so a PEFT output loads on a
    model built from that base) and every module must fit; returns the adapter as converted.
    """
    adapter = load(src, base=base)
    save_as(adapter, out, to=to, force=force)
    return adapter


def edit_metadata(
    src: str | Path,
    out: str | Path,
    *,
    set: Mapping[str, str] | None = None,  # noqa: A002  (the CLI's --set)
    delete: Sequence[str] = (),
    force: bool = False,
) -> dict[str, str]:
    """Copy the ``.safetensors`` file ``src`` to ``out`` with metadata keys ``set`` and ``delete`` removed; returns the new metadata.

    The tensors are copied byte for byte (so every hash of them stays true) and only the header is
    rewritten; ``out`` is written atomically and may not be ``src`` (inputs are never modified).
    Raises :class:`~loratools.errors.ArgumentError` for loratools' own keys (``loratools.*``,
    ``format``), a key both set and deleted, or a deleted key the file does not have.
    """
    src, out = Path(src), Path(out)
    if src.suffix != ".safetensors" or out.suffix != ".safetensors":
        raise ArgumentError("metadata lives in a .safetensors file; give one as input and a .safetensors output name", path=out)
    require_regular(src)
    if out.resolve() == src.resolve() or (out.exists() and out.samefile(src)):
        raise ArgumentError("the output is the input file; inputs are never modified, so write a new file with -o", path=out)
    header = read_header(src)
    values = {k: str(v) for k, v in (set or {}).items()}
    edited = metadata.edited(header.metadata, set_=values, delete=list(delete))
    with atomic_output(out, force=force, directory=False) as tmp:
        rewrite_metadata(header, tmp, edited)
    return edited


def _refuse_kohya_names(adapter: Adapter, path: Path) -> None:
    kohya = sorted(n for n in adapter.modules if spec.KOHYA_NAME.match(n))
    if kohya:
        raise SpecError(
            f"module {kohya[0]} still has its kohya name (read without a base), which PEFT cannot apply; "
            "map the names with `loratools convert FILE --to peft --base BASE` (load(..., base=)), or write kohya output",
            path=path,
        )


def _refuse_in_axis_dora(adapter: Adapter, fmt: str, path: Path) -> None:
    """DoRA along in_features (kohya/LyCORIS ``wd_on_output=False``) has no form outside kohya files.

    W' = (W + ΔW)·diag(m / ‖W + ΔW‖_col) scales columns; PEFT's DoRA scales rows, diag(m' / ‖W + ΔW'‖_row)·(W + ΔW').
    With the same factors no m' matches, and the ΔW' that would (W' − W) has full rank in general, so the
    only exact conversion is the merge into the base.
    """
    found = sorted(n for n, m in adapter.modules.items() if m.magnitude is not None and m.magnitude_axis == "in")
    if found:
        raise SpecError(
            f"module {found[0]} has a DoRA magnitude along in_features (kohya/LyCORIS wd_on_output=False), which {fmt} cannot "
            "hold: its DoRA normalises per output feature and no adapter of the same rank gives the same weights; "
            "merge it into the base (`loratools merge`, exact) or write kohya output",
            path=path,
            code="dora-axis",
        )


def _refuse_variants(adapter: Adapter, fmt: str, path: Path) -> None:
    """Formats without a PEFT config cannot carry aLoRA, layer_replication or a residual init: refuse, never drop them."""
    found = variants.variant_problems(adapter.config)
    if found:
        code, field, why = found[0]
        raise SpecError(f"a {fmt} file cannot carry {field}, so it would be applied as a plain LoRA: {why}", path=path, code=code)
