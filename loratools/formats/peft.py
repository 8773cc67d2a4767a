"""PEFT's layout (spec v1): ``adapter_config.json`` + ``adapter_model.safetensors``, or one ``.safetensors``
file with the config embedded in its metadata.

Reading returns the files as a :class:`~loratools.adapter.RawAdapter`, unchecked (validation reports
every problem at once); writing lays out an adapter that has already been validated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import spec
from ..adapter import Adapter, RawAdapter
from ..errors import FormatError
from ..io.atomic import atomic_output
from ..io.files import read_text
from ..io.tensorfile import Header, load_tensors, write_file


def read(source: str, header: Header, config_path: Path, *, directory: bool) -> RawAdapter:
    """The PEFT adapter whose weights ``header`` describes; its config from the header's metadata, else ``config_path``.

    ``directory``: the user named the adapter directory (a missing config is then that directory's fault).
    """
    if spec.META_CONFIG in header.metadata and not directory:
        config, error = _parse_json(header.metadata[spec.META_CONFIG], f"{header.path} [{spec.META_CONFIG}]")
    elif config_path.exists():
        config, error = _read_config(config_path)
    else:
        if directory:
            message = f"{config_path}: missing; a PEFT adapter directory needs its {spec.CONFIG_NAME}"
        else:
            message = f"{header.path}: no adapter config: put {spec.CONFIG_NAME} beside it or pass the adapter directory"
        return _finish(source, header, None, message, "config-missing")
    return _finish(source, header, config, error, "config-invalid")


def has_config(header: Header, config_path: Path) -> bool:
    """Whether a PEFT config comes with these weights (embedded, or beside them)."""
    return spec.META_CONFIG in header.metadata or config_path.exists()


def _finish(source: str, header: Header, config: Any, config_error: str | None, code: str) -> RawAdapter:
    return RawAdapter(source, config, load_tensors(header), dict(header.metadata), header, config_error, code)


def _read_config(path: Path) -> tuple[Any, str | None]:
    """The parsed config, or why it cannot be: only a regular file up to ``MAX_JSON_BYTES`` is read (a FIFO would hang)."""
    try:
        text = read_text(path)
    except FormatError as err:
        return None, str(err)
    except OSError as err:
        return None, f"{path}: cannot read ({err.strerror or err})"
    return _parse_json(text, str(path))


def _parse_json(text: str, where: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except RecursionError:
        return None, f"{where}: not valid JSON (nested too deep)"
    except ValueError as err:  # an integer of more than 4300 digits
        return None, f"{where}: not valid JSON ({err})"


def write(adapter: Adapter, path: Path, *, force: bool) -> Path:
    """Lay out a validated ``adapter`` at ``path``, atomically, with a checksum of its data section.

    A path ending in ``.safetensors`` gets a single file with the config embedded in its metadata;
    anything else becomes a PEFT directory.
    """
    config = adapter.peft_config()
    meta = adapter.file_metadata()
    single = path.suffix == ".safetensors"
    with atomic_output(path, force=force, directory=not single) as tmp:
        if single:
            meta[spec.META_CONFIG] = json.dumps(config, sort_keys=True)
            write_file(tmp, adapter.state_dict(), meta, checksum_key=spec.META_SHA256, layout_key=spec.META_LAYOUT)
        else:
            write_file(tmp / spec.WEIGHTS_NAME, adapter.state_dict(), meta, checksum_key=spec.META_SHA256, layout_key=spec.META_LAYOUT)
            (tmp / spec.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
