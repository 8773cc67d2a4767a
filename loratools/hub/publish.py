"""Publish an adapter to the Hub: validated, with its model card, in one commit."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import EntryNotFoundError

from .. import spec
from ..api import load, save
from ..errors import InvalidAdapterError
from ..io.atomic import TEMP_PREFIX
from ..io.hubget import get_small
from ..io.remote import ADAPTER_FILES, hub_errors, parse_ref
from ..ops.summary import summarize
from ..validation import validate
from .card import build_card

DEFAULT_MESSAGE = "Upload LoRA adapter with loratools"
CARD_LIMIT = 1 << 20  # bytes of an existing model card read back; a bigger one is refused, not buffered


@dataclass(frozen=True)
class PushResult:
    """Where an adapter landed: the repo URL, the commit (sha and URL) and, with ``create_pr``, the PR."""

    repo_id: str
    url: str
    commit_sha: str
    commit_url: str
    revision: str
    files: tuple[str, ...]
    pr_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def push(
    adapter_path: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Validate the adapter at ``adapter_path`` and publish it to ``repo_id`` in one commit.

    Creates the repo (``private`` if asked) and the branch ``revision`` when missing.  The model card
    starts from the adapter directory's own ``README.md``, else the card already on the Hub, else a
    fresh one; only loratools' front matter keys and marked section change.  ``create_pr`` opens a
    pull request against ``revision`` instead of committing to it.
    """
    repo_id, _ = parse_ref(repo_id)
    report = validate(adapter_path)
    if not report.ok:
        raise InvalidAdapterError(report.errors, path=adapter_path)
    adapter = load(adapter_path)
    branch = revision or "main"
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as scratch, hub_errors(repo_id, branch, token):
        folder = Path(adapter_path)
        if not all((folder / name).is_file() for name in ADAPTER_FILES):  # a bare file, kohya, diffusers: as a PEFT dir
            folder = save(adapter, Path(scratch) / "adapter")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        existing = _local_card(folder) or _remote_card(api, repo_id, branch)
        card = build_card(summarize(adapter), repo_id=repo_id, existing=existing, checksum=adapter.metadata.get(spec.META_SHA256))
        operations = [CommitOperationAdd(name, str(folder / name)) for name in ADAPTER_FILES]
        operations.append(CommitOperationAdd(spec.CARD_NAME, card.encode("utf-8")))
        info = api.create_commit(repo_id, operations, commit_message=message or DEFAULT_MESSAGE, revision=branch, create_pr=create_pr)
    files = (*ADAPTER_FILES, spec.CARD_NAME)
    return PushResult(repo_id, str(url), info.oid, info.commit_url, info.pr_revision or branch, files, info.pr_url)


def _local_card(folder: Path) -> str | None:
    card = folder / spec.CARD_NAME
    return card.read_text(encoding="utf-8") if card.is_file() else None


def _remote_card(api: HfApi, repo_id: str, revision: str) -> str | None:
    """The repo's model card, read into memory with the bounded GET (never into a cache named by the server)."""
    url = f"{api.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{spec.CARD_NAME}"
    token = api.token if isinstance(api.token, str) else None
    try:
        data = get_small(url, token=token, limit=CARD_LIMIT, label=f"{repo_id}@{revision}: {spec.CARD_NAME}")
    except EntryNotFoundError:
        return None
    return data.decode("utf-8", errors="replace")
