"""Checkpoint key layouts that differ from the module names a model (and so an adapter) uses.

transformers 5 renames and fuses checkpoint keys while loading (``conversion_mapping.py``), so the
module path PEFT saves an adapter under is not always the key the base checkpoint stores:

* LLaVA-style VLMs (LLaVA, Gemma 3, Mistral 3, PaliGemma, ...) name the text model
  ``model.language_model.layers...`` but store ``language_model.model.layers...``;
* Qwen2-VL / Qwen2.5-VL name it ``model.language_model.layers...`` but store ``model.layers...``;
* Mixtral names the MoE block ``mlp`` but stores ``block_sparse_moe``;
* Mixtral and Qwen2/3-MoE fuse per-expert ``experts.N.{w1,w3,w2}`` / ``experts.N.{gate,up,down}_proj``
  weights into 3-D ``experts.gate_up_proj`` (gate rows first, then up) and ``experts.down_proj``.

The layout is read from data, never from a transformers import: the base's ``config.json``
``model_type`` when there is one, else the keys' own signature.  :func:`renamed` gives the checkpoint
name of a module name, :func:`expert_pieces` the checkpoint tensors a fused expert parameter lives in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import ModuleIndex, find_weight
from .tensorfile import TensorInfo

CONFIG_NAME = "config.json"

# (module-name pattern, checkpoint-name replacement): the inverse of transformers 5.24
# conversion_mapping.py's renamings for these model types.
# "llava": ^language_model -> model.language_model, then "LlavaModel": ^language_model.model -> language_model
_LLAVA = (
    (
        r"^model\.language_model\.",
        "language_model.model.",
    ),  # "llava" + "LlavaModel"
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^lm_head$", "language_model.lm_head"),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)
_QWEN2_VL = (  # "Qwen2VLForConditionalGeneration": ^visual -> model.visual, ^model(?!\.(language_model|visual)) -> model.language_model
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
)
_MIXTRAL = ((r"\.mlp\.", ".block_sparse_moe."),)  # "mixtral": WeightRenaming(".block_sparse_moe.", ".mlp.")
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    # _MODEL_TO_CONVERSION_PATTERN entries that resolve to "llava"
    **dict.fromkeys(
        ("llava", "aria", "paligemma", "aya_vision", "got_ocr2", "gemma3", "internvl", "vipllava", "mistral3", "pp_chart2table"), _LLAVA
    ),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl"), _QWEN2_VL),
    **dict.fromkeys(("mixtral", "minimax"), _MIXTRAL),
}
# Key signatures that identify a layout when the base has no config.json.
_SIGNATURES = (
    ("language_model.model.", "llava"),
    ("visual.", "qwen2_vl"),
    (".block_sparse_moe.", "mixtral"),
    (".experts.gate_up_proj_bias", "gpt_oss"),  # only gpt-oss experts carry fused biases
)

# Per-expert checkpoint names of each fused expert parameter, in the order transformers
# concatenates them along the output dim (conversion_mapping.py "mixtral" and "qwen2_moe":
# MergeModulelist(dim=0) then Concatenate(dim=1)).
PER_EXPERT: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}
# Expert modules whose fused parameters are stored (E, in, out), transposed to PEFT's (E, out, in):
# transformers 5.24 models/gpt_oss/modeling_gpt_oss.py, @use_experts_implementation(is_transposed=True).
TRANSPOSED_EXPERTS = frozenset({"gpt_oss"})


@dataclass(frozen=True)
class Layout:
    """How one base checkpoint names its tensors: the model type, if known, and its renamings."""

    model_type: str | None
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def transposed_experts(self) -> bool:
        return self.model_type in TRANSPOSED_EXPERTS


@dataclass(frozen=True)
class Piece:
    """Where expert ``expert``'s ΔW rows ``rows`` (PEFT's out dim) live: checkpoint tensor ``key``.

    ``expert`` is None for a fused tensor holding every expert (then ``rows`` is all of them).
    """

    key: str
    expert: int | None
    rows: tuple[int, int]


def layout_of(root: Path, keys: list[str]) -> Layout:
    """The layout of the checkpoint at ``root`` (a directory or file) holding tensor ``keys``."""
    model_type = _model_type(root if root.is_dir() else root.parent)
    if model_type is None:
        model_type = next((kind for mark, kind in _SIGNATURES if any(mark in k or k.startswith(mark) for k in keys)), None)
    return Layout(model_type, RENAMES.get(model_type or "", ()))


def _model_type(directory: Path) -> str | None:
    """``model_type`` from ``config.json`` (a VLM's own, not its text config's); None if unreadable."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else None


def renamed(name: str, layout: Layout) -> str | None:
    """The checkpoint name of module (or parameter) ``name`` under ``layout``; None if no rule applies."""
    out = name
    for pattern, replacement in layout.renames:
        out = re.sub(pattern, replacement, out, count=1)
    return out if out != name else None


def weight_key(module: str, index: ModuleIndex, layout: Layout) -> str | None:
    """The base weight key of ``module``: the layout's exact renamed key first, else :func:`find_weight`."""
    alias = renamed(module, layout)
    if alias is not None and alias in index:
        return index[alias]
    return find_weight(module, index)


def expert_pieces(path: str, experts: int, tensors: dict[str, TensorInfo], index: ModuleIndex, layout: Layout) -> list[Piece] | str:
    """The checkpoint tensors fused expert parameter ``path`` (``...mlp.experts.gate_up_proj``) is stored in.

    A fused tensor under the parameter's own (or renamed) name, else per-expert weights
    ``<owner>.<e>.<name>.weight`` for e < ``experts``, rows split as their shapes say.  Returns the
    reason as a string when neither layout is there or the expert count differs.
    """
    for fused in (path, renamed(path, layout)):
        for key in _with_prefixes(fused, tensors):
            return [Piece(key, None, (0, 0))]
    owner, _, param = path.rpartition(".")
    owners = [o for o in (owner, renamed(owner, layout)) if o is not None]
    for names in PER_EXPERT.get(param, ()):
        for base in owners:
            if weight_key(f"{base}.0.{names[0]}", index, layout) is None:
                continue
            pieces: list[Piece] = []
            for e in range(experts):
                start = 0
                for name in names:
                    found = weight_key(f"{base}.{e}.{name}", index, layout)
                    if found is None:
                        return f"the base stores per-expert weights but has no {base}.{e}.{name}.weight"
                    rows = tensors[found].shape[0] if tensors[found].shape else 0
                    pieces.append(Piece(found, e, (start, start + rows)))
                    start += rows
            if weight_key(f"{base}.{experts}.{names[0]}", index, layout) is not None:
                return f"the adapter holds {experts} experts but the base has more ({base}.{experts}.{names[0]}.weight exists)"
            return pieces
    listed = "|".join(n for ns in PER_EXPERT.get(param, ()) for n in ns) or param
    return f"no base tensor {path} and no per-expert weights {owner}.<e>.{{{listed}}}.weight"


def _with_prefixes(name: str | None, tensors: dict[str, TensorInfo]) -> list[str]:
    """``name`` itself or with leading components dropped, if such a tensor exists (first match)."""
    if name is None:
        return []
    parts = name.split(".")
    for i in range(len(parts) - 1):
        candidate = ".".join(parts[i:])
        if candidate in tensors:
            return [candidate]
    return []
