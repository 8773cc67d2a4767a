"""The model card (``README.md``) loratools writes when it publishes an adapter.

The card is the user's document: we own only its YAML keys ``library_name``, ``base_model`` and
two ``tags``, and one section between :data:`BEGIN` and :data:`END`.  Everything else in a card the
user already has (their prose, license, other tags) is kept as it was, so pushing again only
refreshes our summary.

A single file pushed as it is (a kohya or diffusers LoRA) gets a card that names its format and its
file and says how to fetch and load it; ``library_name`` is then the library that loads it
(``diffusers`` for both, whose ``load_lora_weights`` reads kohya files too), never ``peft``.
"""

from __future__ import annotations

from typing import cast

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .. import spec
from ..errors import FormatError
from ..ops.summary import Summary

BEGIN = "<!-- loratools:begin -->"
END = "<!-- loratools:end -->"
TAGS = ("lora", "loratools")


FORMAT_NAMES = {
    "peft": "PEFT",
    "kohya": "kohya-ss (sd-scripts) LoRA, one .safetensors file",
    "diffusers": "diffusers LoRA, one .safetensors file",
    "lycoris": "LyCORIS (LoHa / LoKr / LoCon, kohya naming), one .safetensors file",
    "mlx": "mlx-lm adapter weights",
}
FILE_LIBRARIES = {"kohya": "diffusers", "diffusers": "diffusers"}  # who loads a single file of that format from a repo


def build_card(
    summary: Summary,
    *,
    repo_id: str,
    existing: str | None = None,
    checksum: str | None = None,
    fmt: str = "peft",
    filename: str | None = None,
) -> str:
    """The card text: ``existing`` (or a fresh card) with our front matter keys and section updated.

    ``filename`` is the one file a single-file push uploads as it is, in format ``fmt``; ``None``
    means the PEFT adapter files.
    """
    if existing is None:
        existing = f"# {repo_id.split('/')[-1]}\n\nA LoRA adapter published with loratools.\n"
    if not existing.lstrip().startswith("---"):
        existing = "---\n\n---\n" + existing  # an empty front matter block, so the parser has one to fill
    try:
        card = ModelCard(existing)
    except (ValueError, yaml.YAMLError) as err:
        raise FormatError(
            f"the model card's YAML front matter is not a valid mapping ({err}); fix or remove it", path=spec.CARD_NAME
        ) from err
    data = cast(ModelCardData, card.data)
    library = FILE_LIBRARIES.get(fmt) if filename is not None else "peft"  # ``fmt`` only matters for a file as it is
    if library is not None:
        data.library_name = library
    elif data.library_name == "peft":  # an earlier PEFT push said so; this file is not PEFT's
        data.library_name = None
    if _is_repo_id(summary.base_model):
        data.base_model = summary.base_model
    tags = list(data.tags or [])
    data.tags = tags + [t for t in TAGS if t not in tags]
    card.text = splice(card.text, section(summary, repo_id=repo_id, checksum=checksum, fmt=fmt, filename=filename))
    return str(card)


def splice(text: str, block: str) -> str:
    """Replace the text between our markers (inclusive) with ``block``, or append it if absent."""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(END) :]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def section(summary: Summary, *, repo_id: str, checksum: str | None = None, fmt: str = "peft", filename: str | None = None) -> str:
    """Our markdown block: a summary table and how to fetch and load the adapter (or its one file)."""
    ranks = sorted({m.rank for m in summary.modules})
    alphas = sorted({m.alpha for m in summary.modules})
    dtypes = sorted({m.dtype for m in summary.modules})
    rows = [
        ("PEFT type", summary.peft_type),
        ("base model", summary.base_model or "not recorded"),
        ("target modules", _targets(summary.targets)),
        ("adapted modules", str(len(summary.modules))),
        ("rank" if len(ranks) == 1 else "ranks", ", ".join(map(str, ranks))),
        ("alpha" if len(alphas) == 1 else "alphas", ", ".join(f"{a:g}" for a in alphas)),
        ("parameters", f"{summary.num_params:,}"),
        ("dtype", ", ".join(dtypes)),
    ]
    if filename is None:
        rows.append(("spec version", summary.spec_version))
    else:  # not PEFT's file: its format instead of a PEFT type and spec version
        rows = [("format", FORMAT_NAMES.get(fmt, fmt)), *rows[1:]]
    if checksum:
        rows.append(("tensor data sha256", f"`{checksum}`"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    if filename is not None:
        python = (
            "```python\n# with a diffusers pipeline of the base model\n"
            f'pipe.load_lora_weights("{repo_id}", weight_name="{filename}")\n```\n'
            if fmt in FILE_LIBRARIES
            else ""
        )
        return (
            f"{BEGIN}\n## Adapter summary\n\n| | |\n|---|---|\n{table}\n\n"
            f"File: `{filename}`, uploaded byte for byte as it was written (not converted).\n\n"
            f"```bash\nloratools pull {repo_id} --file {filename}\nloratools inspect hf://{repo_id}/{filename}\n```\n\n"
            f"{python}{END}"
        )
    return (
        f"{BEGIN}\n## Adapter summary\n\n| | |\n|---|---|\n{table}\n\n"
        f"Files: `{spec.CONFIG_NAME}`, `{spec.WEIGHTS_NAME}` (loratools adapter spec v1, loadable by PEFT).\n\n"
        f"```bash\nloratools pull {repo_id}\n```\n\n"
        "```python\nfrom peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(base_model, "{repo_id}")\n```\n{END}'
    )


def _targets(targets: object) -> str:
    if isinstance(targets, (list, tuple)):
        return ", ".join(f"`{t}`" for t in targets)
    return f"`{targets}`"


def _is_repo_id(name: str | None) -> bool:
    """The Hub only accepts ``base_model`` values that are repo ids, not local paths."""
    if not name or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
