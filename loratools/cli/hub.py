"""`loratools push` and `loratools pull`: publish and fetch adapters on the Hugging Face Hub."""

from __future__ import annotations

import click

import loratools

from ..spec import PUSH_FORMATS, PushFormat
from .console import emit_json, say


def _files(files: tuple[str, ...], asked: str) -> str:
    """``:path`` for a single-file pull (when the reference asked for a file), nothing for a PEFT repo."""
    return f":{files[0]}" if asked.endswith(".safetensors") and len(files) == 1 else ""


@click.command()
@click.argument("adapter")
@click.argument("repo_id")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing); default main.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against the branch instead of committing to it.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option(
    "--format",
    "to",
    type=click.Choice(PUSH_FORMATS),
    help="original: upload ADAPTER as it is (a single file byte for byte); peft: as a PEFT directory (a single file converted). "
    "Default: a kohya, LyCORIS or diffusers file as it is, anything else as PEFT.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(
    adapter: str,
    repo_id: str,
    revision: str | None,
    private: bool,
    create_pr: bool,
    message: str | None,
    token: str | None,
    to: PushFormat | None,
    as_json: bool,
) -> None:
    """Validate ADAPTER and publish it to the Hub repo REPO_ID with a model card, in one commit.

    An invalid adapter is refused (exit 3, see `loratools validate`).  The repo's README.md keeps
    everything except loratools' front matter keys and its marked summary section.  A single kohya,
    LyCORIS or diffusers .safetensors file keeps its format and its name (fetch it back with
    `loratools pull REPO_ID --file NAME`); --format peft converts it instead.

    \b
    Examples:
      loratools push ./my-adapter me/my-adapter
      loratools push ./my-adapter me/my-adapter --revision experiment -m "rank 8 run"
      loratools push ./my-adapter org/adapter --create-pr --json
      loratools push ./pixel-art.safetensors me/pixel-art
    """
    result = loratools.push(adapter, repo_id, revision=revision, private=private, create_pr=create_pr, message=message, token=token, to=to)
    if as_json:
        emit_json(result.to_dict())
        return
    say(f"pushed {adapter} to {result.url} ({result.revision})")
    say(f"commit: {result.commit_sha}")
    if result.pr_url:
        say(f"pull request: {result.pr_url}")


@click.command()
@click.argument("ref", metavar="REPO_ID[@REVISION][/FILE.safetensors]")
@click.option("--file", "filename", metavar="NAME", help="Fetch this one .safetensors file of the repo (a kohya or diffusers LoRA).")
@click.option("--revision", metavar="REV", help="Branch, tag or commit (same as REPO_ID@REV; needed for a '/' in it with --file).")
@click.option(
    "-o",
    "--out",
    "--output",
    "out_dir",
    metavar="DIR",
    help="Where to put the adapter (default: ./NAME for owner/NAME); with --file the folder for it, or a .safetensors path.",
)
@click.option("--offline", is_flag=True, help="Use the huggingface_hub cache only (also: HF_HUB_OFFLINE=1).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(
    ref: str,
    filename: str | None,
    revision: str | None,
    out_dir: str | None,
    offline: bool,
    token: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Download the adapter REPO_ID[@REVISION], verify it, and write it to DIR.

    Only adapter_config.json and adapter_model.safetensors are fetched; they must pass the spec checks
    and their recorded checksum before DIR appears.  With --file (or REPO_ID/FILE.safetensors) only
    that file is fetched, checked against the Hub's sha256 and the spec, and written as DIR/FILE.
    Any ADAPTER argument also accepts hf://owner/name[@revision] and
    hf://owner/name[@revision]/path/file.safetensors (a third part ending in .safetensors names a
    file; the revision then ends at the first '/', except refs/pr/N: write another '/' as %2F).

    \b
    Examples:
      loratools pull me/my-adapter
      loratools pull me/my-adapter@experiment -o ./exp --force
      loratools pull me/my-adapter --offline --json
      loratools pull me/sdxl-loras --file pixel-art.safetensors -o ./loras
      loratools inspect hf://me/my-adapter@main
      loratools validate hf://me/sdxl-loras@v2/styles/pixel-art.safetensors
    """
    result = loratools.pull(ref, revision=revision, filename=filename, out=out_dir, offline=offline, token=token, force=force)
    if as_json:
        emit_json(result.to_dict())
        return
    say(f"pulled {result.repo_id}@{result.revision}{_files(result.files, filename or ref)} into {result.path}")
    say(f"commit: {result.commit_sha}")
