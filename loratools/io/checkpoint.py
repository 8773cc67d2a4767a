"""Header-only view of a base checkpoint: one ``.safetensors`` file or a HF model directory.

A directory holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.  Only
headers are read (kilobytes, even for 140 GB models); merge and validation look tensors up here and
map adapter module names onto base weight keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import spec
from ..errors import FormatError
from .files import read_text, require_file_or_dir
from .tensorfile import Header, TensorInfo, read_header

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_CONFIG_LIMIT = 4 * 2**20  # bytes; real model configs are a few KB
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "model.pt")


@dataclass(frozen=True)
class Checkpoint:
    """A base checkpoint's layout: shard files in order, their headers, and the index if any."""

    root: Path
    shards: list[Path]
    headers: dict[str, Header]  # shard file name -> header
    index: dict[str, Any] | None

    @property
    def is_file(self) -> bool:
        return self.root.is_file()

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name, across shards, in shard then file order (built once: merges look tensors up per row
        block's parameter; callers do not change it)."""
        return {name: info for h in self.headers.values() for name, info in h.tensors.items()}

    def shard_of(self, name: str) -> Path:
        """The shard file holding tensor ``name``."""
        for shard, header in zip(self.shards, self.headers.values(), strict=True):
            if name in header.tensors:
                return shard
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def model_config(self) -> dict[str, Any] | None:
        """The model directory's ``config.json`` as a dict (it names the model type), or None.

        None for a single-file checkpoint (a config.json beside it may belong to anything) and for a
        missing, oversized or unreadable file: the file comes from the same untrusted place as the weights.
        """
        if self.is_file:
            return None
        path = self.root / CONFIG_NAME
        try:
            if path.stat().st_size > _CONFIG_LIMIT:
                return None
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return config if isinstance(config, dict) else None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read the headers of the checkpoint at ``path``; raises :class:`FormatError` if there is none."""
    path = Path(path)
    if not path.exists():
        raise FormatError("no such file or directory", path=path)
    require_file_or_dir(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError("base checkpoints must be safetensors (pickles are refused: loading one can run code)", path=path)
        return Checkpoint(path, [path], {path.name: read_header(path)}, None)
    index_path = path / INDEX_NAME
    if index_path.exists():
        text = read_text(index_path)  # a regular file, capped in size, UTF-8
        try:
            index = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, 5000-digit ints
            raise FormatError(f"corrupt index: not UTF-8 JSON ({spec.clip(str(err))[1:-1]})", path=index_path) from None
        names = shard_names(index, index_path)
        shards = [path / n for n in sorted(names)]
        return Checkpoint(path, shards, {s.name: read_header(s) for s in shards}, index)
    single = path / SINGLE_NAME
    if single.exists():
        return Checkpoint(path, [single], {single.name: read_header(single)}, None)
    pickles = [p for p in _PICKLES if (path / p).exists()]
    if pickles:
        raise FormatError(
            f"only pickle weights ({pickles[0]}) found; convert the base to safetensors first (pickles are refused)", path=path
        )
    raise FormatError(f"no {SINGLE_NAME} or {INDEX_NAME} in the directory", path=path)


def shard_names(index: object, path: Path) -> list[str]:
    """The shard file names a parsed ``model.safetensors.index.json`` lists, in first-seen order.

    As transformers reads it: an object whose ``weight_map`` maps tensor names to file names.
    Every name must be a plain file name in the checkpoint directory (no separator, no ``..``,
    no NUL), so a hostile index cannot point outside it.
    """
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        got = type(index).__name__ if not isinstance(index, dict) else f"weight_map {spec.clip(weight_map)}"
        raise FormatError(f"corrupt index: needs an object with a weight_map object (tensor -> shard file), got {got}", path=path)
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not isinstance(name, str):
            raise FormatError(f"corrupt index: shard file names must be strings, got {spec.clip(name)}", path=path)
        if name in ("", ".", "..") or "\0" in name or Path(name).name != name or "\\" in name:
            raise FormatError(f"index names a shard outside the checkpoint directory: {spec.clip(name)}", path=path)
    return names


class ModuleIndex(Mapping[str, str]):
    """Module path -> weight key for every ``<module>.weight`` key of a checkpoint, plus a suffix index.

    The suffix index maps every dot-suffix of every module path (``layers.0.q`` and ``q`` for
    ``model.layers.0.q``) to its one module's key, or to ``None`` when several modules end that
    way.  It is built once per checkpoint (O(keys · depth)), so :func:`find_weight` costs O(depth)
    per adapter module instead of a scan over every base key.
    """

    def __init__(self, keys: Iterable[str]):
        self._weights = {k[: -len(".weight")]: k for k in keys if k.endswith(".weight")}
        self._suffixes: dict[str, str | None] | None = None

    def __getitem__(self, module: str) -> str:
        return self._weights[module]

    def __contains__(self, module: object) -> bool:
        return module in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def ending_with(self, name: str) -> str | None:
        """The weight key of the one module whose path ends with ``"." + name``; None for none or several."""
        if self._suffixes is None:
            suffixes: dict[str, str | None] = {}
            for module, key in self._weights.items():
                for tail in _tails(module):
                    suffixes[tail] = None if tail in suffixes else key
            self._suffixes = suffixes
        return self._suffixes.get(name)


def module_index(keys: Iterable[str]) -> ModuleIndex:
    """Map module path -> weight key for every ``<module>.weight`` key of a checkpoint."""
    return ModuleIndex(keys)


def find_weight(module: str, modules: ModuleIndex) -> str | None:
    """The base weight key of adapter ``module``, tolerating prefixes on either side.

    Tries the exact name, then drops leading components of the adapter name (``model.layers.0.q``
    finds base ``layers.0.q``; a diffusers component prefix even before a one-component name:
    ``transformer.proj_out`` finds ``proj_out``), then base names that end with the adapter name.  PEFT wraps targeted
    embeddings, so ``<module>.base_layer`` is tried too.  ``None`` if nothing or several match.
    """
    for name in dict.fromkeys((module, module.removesuffix(".base_layer"))):
        if name in modules:
            return modules[name]
        for tail in _tails(name)[:-1]:  # never the last component alone
            if tail in modules:
                return modules[tail]
        component = next((c for c in spec.DIFFUSERS_COMPONENTS if name.startswith(c)), None)
        if component is not None and name[len(component) :] in modules:
            return modules[name[len(component) :]]
        longer = modules.ending_with(name)
        if longer is not None:
            return longer
    return None


def _tails(name: str) -> list[str]:
    """Every dot-suffix of ``name``, longest first: ``a.b.c`` -> ``["b.c", "c"]``."""
    tails, i = [], name.find(".")
    while i >= 0:
        tails.append(name[i + 1 :])
        i = name.find(".", i + 1)
    return tails
