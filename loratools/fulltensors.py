"""The planner's rules for full tensors and embeddings: modules_to_save, trainable tokens, tied heads, grown vocabularies.

What PEFT does at inference is the reference (peft 0.21.2):

* a ``modules_to_save`` tensor (``ModulesToSaveWrapper``, peft/utils/other.py) *replaces* the base
  module for the adapter that holds it, whatever weight the adapter is given;
* trainable tokens (``TrainableTokensLayer``, peft/tuners/trainable_tokens/layer.py) replace rows
  ``trainable_token_indices`` of an embedding with ``trainable_tokens_delta`` (``index_copy``, not
  an addition); two adapters may only replace disjoint rows;
* on a base with tied embeddings (``tie_word_embeddings``; the checkpoint stores no ``lm_head.weight``)
  a LoRA or full tensor on ``embed_tokens`` changes only the input embedding and one on ``lm_head``
  only the head, since PEFT wraps one module and the other keeps the shared base weight; trainable
  tokens on the tied embedding change both (PEFT ties the head's wrapper to the embedding's).

So a merge of a tied base keeps it tied only when embedding and head end up equal; otherwise it
unties, writing ``lm_head.weight`` (from the base embedding plus the head's own edits) and setting
``tie_word_embeddings: false``, as PEFT's ``save_pretrained`` of an untied model does.  (PEFT's own
merge_and_unload adds a LoRA on a tied embedding to the shared weight, changing the head too; its
merged model then disagrees with its unmerged one, and we follow the unmerged one.)

A weight other than 1 has no exact meaning for a replacement (PEFT's ``add_weighted_adapter`` in
peft/tuners/lora/model.py copies modules_to_save unweighted), so it is refused.  An adapter trained
after ``resize_token_embeddings`` holds embedding/head tensors with more rows than the base: the
output grows to them, and ``vocab_size`` in config.json follows, provided every vocabulary tensor of
the output is fully given by the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import spec
from .adapter import Adapter
from .errors import Problem
from .io.checkpoint import Checkpoint
from .io.tensorfile import TensorInfo

HEAD = "lm_head.weight"
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
TIED_CONFIG = "tie_word_embeddings"


@dataclass(frozen=True)
class Tokens:
    """Trainable tokens: rows ``indices`` of a base embedding become ``values`` (k, dim)."""

    indices: tuple[int, ...]
    values: torch.Tensor


@dataclass(frozen=True)
class Tying:
    """A base whose head is its input embedding: ``head`` is not stored, ``embed`` is."""

    head: str
    embed: str


def base_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The base's ``config.json`` (empty when there is none, or it cannot be read)."""
    path = checkpoint.root / "config.json"
    if checkpoint.is_file or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return config if isinstance(config, dict) else {}


def tying(checkpoint: Checkpoint, tensors: Mapping[str, TensorInfo]) -> Tying | None:
    """The tied head of ``checkpoint``: no ``lm_head.weight`` stored, one input embedding, the config not untied."""
    if HEAD in tensors or base_config(checkpoint).get(TIED_CONFIG) is False:
        return None
    embeds = [k for k in tensors if k.endswith(EMBED_SUFFIXES)]
    return Tying(HEAD, embeds[0]) if len(embeds) == 1 else None


def with_head(tensors: dict[str, TensorInfo], tied: Tying | None) -> dict[str, TensorInfo]:
    """``tensors`` plus the tied head as a tensor of its own (read from the embedding), so modules can target it."""
    return {**tensors, tied.head: tensors[tied.embed]} if tied is not None else tensors


def saved_tensors(extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors that act at inference, under the keys of the tensors they replace.

    PEFT saves a resized vocabulary's wrapped layers whole (``save_embedding_layers``,
    peft/utils/save_and_load.py): ``X.modules_to_save.weight`` is the trained copy the wrapper
    runs, so it wins over a plain ``X.weight``; ``X.original_module.weight`` is never run.
    """
    out: dict[str, torch.Tensor] = {}
    trained: dict[str, torch.Tensor] = {}
    for key, tensor in extras.items():
        if ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            trained[key.replace(".modules_to_save.", ".")] = tensor
        else:
            out[key] = tensor
    return {**out, **trained}


def is_tokens(key: str) -> bool:
    return key.endswith(TOKENS_SUFFIX)


def token_indices(config: Mapping[str, Any], key: str) -> list[int] | None:
    """The rows a ``trainable_tokens_delta`` tensor replaces, from ``trainable_token_indices``.

    A list applies to the input embedding; a dict maps module names (matched as target_modules
    entries are) to lists (peft/tuners/trainable_tokens/config.py).
    """
    module = key.removeprefix(spec.PREFIX).removesuffix(TOKENS_SUFFIX)
    given = config.get("trainable_token_indices")
    if isinstance(given, list):
        return [int(i) for i in given]
    if isinstance(given, dict):
        for name, indices in given.items():
            if module == name or module.endswith("." + name):
                return [int(i) for i in indices]
    return None


def full_problems(
    key: str, tensor: torch.Tensor, target: str, info: TensorInfo, weight: float, where: str, vocab: set[str]
) -> list[Problem]:
    """Why full tensor ``tensor`` cannot replace base tensor ``target`` (``info``) under ``weight``."""
    problems = []
    if weight != 1.0:
        message = (
            f"replaces {target} in full, so weight {weight:g} has no exact meaning (PEFT swaps the module in unweighted); "
            "merge this adapter with weight 1 or drop the tensor"
        )
        problems.append(Problem("saved-weighted", where, message))
    shape = tuple(tensor.shape)
    grown = target in vocab and len(shape) == len(info.shape) and shape[1:] == info.shape[1:] and shape[0] > info.shape[0]
    if shape != info.shape and not grown:
        message = f"saved tensor {list(shape)} would replace base tensor {target}, which is {list(info.shape)}"
        problems.append(Problem("saved-shape-mismatch", where, message))
    return problems


def token_problems(tensor: torch.Tensor, indices: list[int] | None, info: TensorInfo, where: str, weight: float) -> list[Problem]:
    """Why trainable-token rows cannot replace rows of base tensor ``info``."""
    if indices is None:
        return [Problem("tokens-unmatched", where, "trainable_tokens_delta but no trainable_token_indices entry names this module")]
    if weight != 1.0:
        message = f"replaces embedding rows, so weight {weight:g} has no exact meaning (PEFT copies them in); use weight 1"
        return [Problem("saved-weighted", where, message)]
    rows = info.shape[0] if info.shape else 0
    if tuple(tensor.shape) != (len(indices), *info.shape[1:]) or any(not 0 <= i < rows for i in indices):
        message = (
            f"holds {list(tensor.shape)} rows for {len(indices)} token indices of base tensor {info.name} {list(info.shape)}; "
            "each index needs one row, and every index must be < the vocabulary size"
        )
        return [Problem("tokens-shape-mismatch", where, message)]
    return []


def merge_tokens(parts: Sequence[Tokens], where: str) -> tuple[Tokens | None, list[Problem]]:
    """Several adapters' rows of one tensor, as one edit; overlapping rows are refused, as PEFT does."""
    seen: set[int] = set()
    for p in parts:
        if seen & set(p.indices):
            message = f"token indices {sorted(seen & set(p.indices))[:5]} are replaced by two adapters; PEFT refuses overlapping tokens"
            return None, [Problem("tokens-overlap", where, message)]
        seen |= set(p.indices)
    if not parts:
        return None, []
    return Tokens(sum((p.indices for p in parts), ()), torch.cat([p.values.float() for p in parts])), []


def vocab_keys(tensors: Mapping[str, TensorInfo], tied: Tying | None) -> set[str]:
    """Tensors whose rows are the vocabulary: the input embedding and the head."""
    keys = {k for k in tensors if k.endswith(EMBED_SUFFIXES) or k == HEAD}
    return keys | ({tied.head} if tied is not None else set())


def has_full_tensors(adapter: Adapter) -> bool:
    """Whether ``adapter`` replaces base tensors or rows (saved base_layer copies are the base's own)."""
    return any(".base_layer." not in k for k in adapter.extra_tensors)


def same_edit(a: Any, b: Any) -> bool:
    """Whether two planned edits of embedding and head give equal tensors (so the output may stay tied)."""
    if a.terms or b.terms or a.magnitude is not None or b.magnitude is not None or a.shape != b.shape:
        return False
    ra, rb = a.replacement, b.replacement
    if (ra is None) != (rb is None) or (ra is not None and not torch.equal(ra, rb)):
        return False
    ta, tb = a.tokens, b.tokens
    if (ta is None) != (tb is None):
        return False
    return ta is None or (ta.indices == tb.indices and torch.equal(ta.values, tb.values))


def resolve_tied(edits: dict[str, Any], tied: Tying | None, make: Any) -> dict[str, Any]:
    """``edits`` with the tied head resolved; returns the config.json fields to set.

    ``make(key, **fields)`` builds an empty edit.  Trainable tokens on the embedding apply to the
    head too; the head stays tied exactly when its edit equals the embedding's.
    """
    if tied is None or (tied.embed not in edits and tied.head not in edits):
        return {}
    embed = edits.get(tied.embed) or make(tied.embed)
    head = edits.get(tied.head) or make(tied.head)
    if embed.tokens is not None and head.tokens is None:
        head = replace(head, tokens=embed.tokens)
    head = replace(head, source=tied.embed)
    if same_edit(embed, head):
        edits.pop(tied.head, None)
        return {}
    edits[tied.head] = head
    return {TIED_CONFIG: False}


def mixed_problems(edits: Mapping[str, Any]) -> list[Problem]:
    """Trainable tokens on a tensor that is also replaced in full: PEFT cannot load both on one module
    (its wrappers nest neither way), so the result has no reference; refused."""
    message = "trainable tokens and a full copy (modules_to_save) both replace this tensor; PEFT cannot run both: merge them separately"
    return [
        Problem("tokens-replaced", key, message) for key, e in sorted(edits.items()) if e.tokens is not None and e.replacement is not None
    ]


def vocab_problems(
    edits: Mapping[str, Any], stored: Mapping[str, TensorInfo], tensors: Mapping[str, TensorInfo], vocab: set[str]
) -> tuple[list[Problem], dict[str, Any]]:
    """Every vocabulary tensor of the output (``stored`` ones, and any written anew) must have the same number of rows.

    Returns the problems and the new ``vocab_size`` when the vocabulary grows.
    """
    rows = {}
    for key in vocab:
        edit = edits.get(key)
        if key in stored or edit is not None:
            shape = edit.shape if edit is not None and edit.shape is not None else tensors[key].shape
            rows[key] = shape[0]
    if len(set(rows.values())) <= 1:
        grown = [edits[k].shape[0] for k in rows if k in edits and edits[k].shape is not None]
        return [], ({"vocab_size": max(grown)} if grown else {})
    listed = ", ".join(f"{k} {n}" for k, n in sorted(rows.items()))
    message = (
        f"the adapter grows the vocabulary but not every vocabulary tensor: {listed} rows; the rows it does not hold "
        "are undefined (save the resized embeddings and head with the adapter: modules_to_save)"
    )
    return [Problem("vocab-mismatch", min(rows), message)], {}
