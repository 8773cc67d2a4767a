"""`loratools meta`: edit a .safetensors file's metadata into a new file, tensors byte for byte."""

from __future__ import annotations

import click

import loratools

from .console import emit_json, say


def _assignments(values: tuple[str, ...]) -> dict[str, str]:
    """--set KEY=VALUE options as a dict, split at the first "=" (the value may hold more); a key set twice is refused."""
    pairs: dict[str, str] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--set")
        if key in pairs:
            raise click.BadParameter(f"key {key!r} is set twice", param_hint="--set")
        pairs[key] = value
    return pairs


@click.command()
@click.argument("path")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a metadata key (repeatable), e.g. modelspec.trigger_phrase=sks dog.",
)
@click.option("--delete", "deletions", multiple=True, metavar="KEY", help="Remove a metadata key (repeatable).")
@click.option("-o", "--out", "--output", "output", required=True, help="Output .safetensors file (never the input).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the new metadata as JSON.")
def meta(path: str, assignments: tuple[str, ...], deletions: tuple[str, ...], output: str, force: bool, as_json: bool) -> None:
    """Write a copy of the .safetensors file PATH with its metadata edited: the tensors are copied
    byte for byte, so their hashes stay true; only the header is rewritten, atomically.

    Keys are kohya's ss_*, modelspec.*, or any other string; loratools' own keys and "format" are
    recomputed on every write and cannot be edited.  `loratools inspect PATH` shows the metadata.

    \b
    Examples:
      loratools meta my_lora.safetensors --set "modelspec.trigger_phrase=sks dog" -o tagged.safetensors
      loratools meta my_lora.safetensors --delete ss_tag_frequency --delete ss_dataset_dirs -o clean.safetensors
    """
    pairs = _assignments(assignments)
    if not pairs and not deletions:
        raise click.UsageError("nothing to change: give --set KEY=VALUE or --delete KEY (inspect shows the metadata)")
    edited = loratools.edit_metadata(path, output, set=pairs, delete=deletions, force=force)
    if as_json:
        emit_json({"input": path, "output": output, "set": pairs, "deleted": list(deletions), "metadata": edited})
        return
    changes = [f"set {', '.join(pairs)}"] if pairs else []
    changes += [f"deleted {', '.join(deletions)}"] if deletions else []
    say(f"{path} -> {output}: {'; '.join(changes)} ({len(edited)} metadata keys; tensors copied unchanged)")
