"""`loratools push` and `loratools pull`: publish and fetch adapters on the Hugging Face Hub."""

from __future__ import annotations

import click

import loratools

from .console import emit_json, say


@click.command()
@click.argument("adapter")
@click.argument("repo_id")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing); default main.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against the branch instead of committing to it.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(
    adapter: str, repo_id: str, revision: str | None, private: bool, create_pr: bool, message: str | None, token: str | None, as_json: bool
) -> None:
    """Validate ADAPTER and publish it to the Hub repo REPO_ID with a model card, in one commit.

    An invalid adapter is refused (exit 3, see `loratools validate`).  The repo's README.md keeps
    everything except loratools' front matter keys and its marked summary section.

    \b
    Examples:
      loratools push ./my-adapter me/my-adapter
      loratools push ./my-adapter me/my-adapter --revision experiment -m "rank 8 run"
      loratools push ./my-adapter org/adapter --create-pr --json
    """
    result = loratools.push(adapter, repo_id, revision=revision, private=private, create_pr=create_pr, message=message, token=token)
    if as_json:
        emit_json(result.to_dict())
        return
    say(f"pushed {adapter} to {result.url} ({result.revision})")
    say(f"commit: {result.commit_sha}")
    if result.pr_url:
        say(f"pull request: {result.pr_url}")


@click.command()
@click.argument("ref", metavar="REPO_ID[@REVISION]")
@click.option("-o", "--out", "--output", "out_dir", metavar="DIR", help="Where to put the adapter (default: ./NAME for owner/NAME).")
@click.option("--offline", is_flag=True, help="Use the huggingface_hub cache only (also: HF_HUB_OFFLINE=1).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(ref: str, out_dir: str | None, offline: bool, token: str | None, force: bool, as_json: bool) -> None:
    """Download the adapter REPO_ID[@REVISION], verify it, and write it to DIR.

    Only adapter_config.json and adapter_model.safetensors are fetched; they must pass the spec checks
    and their recorded checksum before DIR appears.  Any ADAPTER argument also accepts
    hf://owner/name[@revision].

    \b
    Examples:
      loratools pull me/my-adapter
      loratools pull me/my-adapter@experiment -o ./exp --force
      loratools pull me/my-adapter --offline --json
      loratools inspect hf://me/my-adapter@main
    """
    result = loratools.pull(ref, out=out_dir, offline=offline, token=token, force=force)
    if as_json:
        emit_json(result.to_dict())
        return
    say(f"pulled {result.repo_id}@{result.revision} into {result.path}")
    say(f"commit: {result.commit_sha}")
