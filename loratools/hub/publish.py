"""Publish an adapter to the Hub: validated, with its model card, in one commit.

A PEFT directory is uploaded as it is.  A single ``.safetensors`` file in another format (kohya,
diffusers, LyCORIS, ...) is uploaded as it is too, byte for byte under its own name, with a card
that names its format; ``to="peft"`` converts it to a PEFT directory instead (what push did for
every single file before).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import EntryNotFoundError

from .. import spec
from ..adapter import Adapter
from ..api import load, save, source_format
from ..errors import ArgumentError, InvalidAdapterError
from ..formats import lycoris
from ..io.atomic import TEMP_PREFIX
from ..io.hubget import bounded_session, get_small
from ..io.hubref import check_filename
from ..io.remote import ADAPTER_FILES, hub_errors, parse_ref
from ..io.tensorfile import read_header
from ..ops.summary import summarize
from ..validation import validate
from .card import build_card

DEFAULT_MESSAGE = "Upload LoRA adapter with loratools"
CARD_LIMIT = 1 << 20  # bytes of an existing model card read back; a bigger one is refused, not buffered
SELF_CONTAINED = ("kohya", "lycoris", "diffusers")  # single-file formats that read alone: pushed as they are by default


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
    to: spec.PushFormat | None = None,
) -> PushResult:
    """Validate the adapter at ``adapter_path`` and publish it to ``repo_id`` in one commit.

    ``to`` chooses what is uploaded: ``"original"`` the input as it is (a PEFT directory's adapter
    files, or a single ``.safetensors`` file byte for byte under its own name), ``"peft"`` a PEFT
    directory (a single file converted).  The default keeps a single file in its own format unless
    it is PEFT's (which becomes a directory, as PEFT loads it).  Creates the repo (``private`` if
    asked) and the branch ``revision`` when missing.  The model card starts from the adapter
    directory's own ``README.md``, else the card already on the Hub, else a fresh one; only
    loratools' front matter keys and marked section change.  ``create_pr`` opens a pull request
    against ``revision`` instead of committing to it.  Every Hub call is bounded in time
    (:func:`loratools.io.hubget.bounded_session`).
    """
    repo_id, _ = parse_ref(repo_id)
    if to is not None and to not in spec.PUSH_FORMATS:
        raise ArgumentError(f"unknown push format {to!r}; choose one of {', '.join(spec.PUSH_FORMATS)}")
    source = Path(adapter_path)
    branch = revision or "main"
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as scratch:
        single = source.is_file()
        if single:  # what is validated is what is uploaded: a private copy, never the input itself
            source = _private_copy(source, Path(scratch), alone=to == "original")
        report = validate(source)
        if not report.ok:  # named by the user's path, not the private copy's
            errors = [replace(p, where=p.where.replace(str(source), str(adapter_path))) for p in report.errors]
            raise InvalidAdapterError(errors, path=adapter_path)
        adapter = load(source)
        fmt = _file_format(adapter, source)
        keep = to == "original" or (to is None and single and fmt in SELF_CONTAINED)
        if keep and not single and not all((source / name).is_file() for name in ADAPTER_FILES):
            raise ArgumentError(
                f"{adapter_path} is a {fmt} directory, not PEFT's; push its .safetensors file as it is, or convert with --format peft",
                path=adapter_path,
            )
        uploads, filename = _uploads(adapter, source, Path(scratch), keep=keep)
        with bounded_session(), hub_errors(repo_id, branch, token):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            existing = (None if single else _local_card(source)) or _remote_card(api, repo_id, branch)
            summary, checksum = summarize(adapter), adapter.metadata.get(spec.META_SHA256)
            card = build_card(summary, repo_id=repo_id, existing=existing, checksum=checksum, fmt=fmt, filename=filename)
            operations = [CommitOperationAdd(name, str(path)) for name, path in uploads.items()]
            operations.append(CommitOperationAdd(spec.CARD_NAME, card.encode("utf-8")))
            info = api.create_commit(repo_id, operations, commit_message=message or DEFAULT_MESSAGE, revision=branch, create_pr=create_pr)
    files = (*uploads, spec.CARD_NAME)
    return PushResult(repo_id, str(url), info.oid, info.commit_url, info.pr_revision or branch, files, info.pr_url)


def _private_copy(path: Path, scratch: Path, *, alone: bool) -> Path:
    """``path`` copied into ``scratch`` under its own name, with the ``adapter_config.json`` beside it unless ``alone``.

    The neighbouring config is how a PEFT or mlx-lm weights file reads where it lies; a file
    uploaded as it is must read the same without it (it goes up alone).
    """
    config = path.parent / spec.CONFIG_NAME
    if not alone and config.is_file():
        shutil.copyfile(config, scratch / spec.CONFIG_NAME)
    return Path(shutil.copyfile(path, scratch / path.name))


def _file_format(adapter: Adapter, path: Path) -> str:
    """The format the card names: the one the adapter was read in, ``lycoris`` for a LyCORIS file (read through kohya's names)."""
    fmt = source_format(adapter)
    if fmt == "kohya" and path.is_file() and lycoris.is_lycoris(read_header(path).tensors):
        return "lycoris"
    return fmt


def _uploads(adapter: Adapter, source: Path, scratch: Path, *, keep: bool) -> tuple[dict[str, Path], str | None]:
    """Repo name -> local file to upload, and the single file's name when it goes up as it is (else ``None``)."""
    if keep and source.is_file():
        name = check_filename(source.name)  # the name it gets on the Hub, and in every hf:// reference to it
        return {name: source}, name
    folder = source
    if not all((folder / name).is_file() for name in ADAPTER_FILES):  # a bare file, kohya, diffusers, mlx: as a PEFT dir
        folder = save(adapter, scratch / "adapter")
    return {name: folder / name for name in ADAPTER_FILES}, None


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
