"""Everything of a mirrored checkpoint besides its weight shards: side files, the index, config.json, free space.

A merged checkpoint is the base with its weights rewritten; the rest is copied (config, tokenizer,
generation config) or rewritten to stay true (the index's ``total_size`` and new tensors, config
fields the merge changes).  Only regular files inside the base are copied
(:func:`loratools.io.files.tree_files`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import DiskSpaceError, FormatError
from .atomic import TEMP_PREFIX
from .files import copy_regular, human_bytes, read_text, tree_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SKIP_DIRS = {".git", ".cache", ".huggingface"}
CONFIG_NAME = "config.json"


def _is_weights(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")


def _copy_roots(root: Path) -> list[Path]:
    """Where side files may live: the base folder and, for a Hub cache snapshot, that repo's blobs.

    huggingface_hub lays a snapshot out as ``<repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>``
    (``file_download.py``, huggingface_hub 2.4.0), so every file of a cached base is such a link.
    """
    real = root.resolve()
    return [real, real.parent.parent / "blobs"] if real.parent.name == "snapshots" else [real]


def side_files(root: Path, weight_files: set[str]) -> list[Path]:
    """Every file in model directory ``root`` to copy beside merged weights (config, tokenizer, ...), relative to ``root``.

    Weight files (``.safetensors``, pickles, ...) and indexes are left out, in subfolders too (Meta's
    ``original/consolidated.00.pth``): the merged output writes its own, and a stale copy of unmerged
    weights would be loaded instead of the merged ones.  Only regular files are copied, and only
    from inside the base: a symlink is followed when its target is inside the base (or the Hub
    cache's blobs of a cached base); one that leaves it, a FIFO or a device is refused, naming it,
    before anything is written (:func:`loratools.io.files.tree_files`).
    """
    names = [
        p.name
        for p in sorted(root.iterdir())
        if p.name not in weight_files and not p.name.startswith(TEMP_PREFIX) and p.name not in _SKIP_DIRS
    ]
    return tree_files(root, names, roots=_copy_roots(root), skip=_is_weights)


def copy_side_files(root: Path, paths: list[Path], dst: Path) -> None:
    """Copy ``paths`` (relative to ``root``, from :func:`side_files`) into ``dst``, folders as needed."""
    for rel in paths:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_regular(root / rel, dst / rel)


def write_index(
    index: Mapping[str, Any], total_size: int, dst: Path, added: Mapping[str, str] | None = None, removed: Collection[str] = ()
) -> None:
    """The base's ``model.safetensors.index.json`` with ``metadata.total_size`` for the new data size.

    ``added``: tensors the output holds beyond the base's, by name -> shard file name; ``removed``:
    base tensors it no longer holds (scales of weights written dequantized, renamed tensors' old names).
    """
    out = dict(index)
    if added or removed:
        kept = {k: v for k, v in dict(index.get("weight_map") or {}).items() if k not in set(removed)}
        out["weight_map"] = {**kept, **dict(added or {})}
    out["metadata"] = {**dict(index.get("metadata") or {}), "total_size": total_size}
    dst.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_free_space(where: Path, need: int) -> None:
    """Raise :class:`DiskSpaceError` unless the file system holding ``where`` has ``need`` bytes free."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(
            f"needs {human_bytes(need)} free for the output but only {human_bytes(free)} is; free some space or write elsewhere with -o",
            path=probe,
        )


def update_config(path: Path, updates: Mapping[str, Any], removed: Collection[str] = ()) -> None:
    """Set top-level fields of a copied ``config.json`` (``tie_word_embeddings``, ``vocab_size``), delete ``removed`` ones.

    transformers reads ``text_config`` first for multimodal models, so a field found there is set
    (or deleted) there too.  ``quantization_config`` is removed when the weights are written dequantized.
    """
    if not (updates or removed) or not path.is_file():
        return
    try:
        config = json.loads(read_text(path))
    except (ValueError, RecursionError) as err:  # JSONDecodeError; FormatError from read_text is a ValueError too
        raise FormatError(f"cannot update the base's config ({err}); the merge changes {sorted(updates)}", path=path) from None
    if not isinstance(config, dict):
        raise FormatError(f"is not a JSON object, so the merge cannot set {sorted(updates)} in it", path=path)
    config.update(updates)
    text = config.get("text_config")
    for holder in (config, text) if isinstance(text, dict) else (config,):
        for key in removed:
            holder.pop(key, None)
    if isinstance(text, dict):
        text.update({k: v for k, v in updates.items() if k in text})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
