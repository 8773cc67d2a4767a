"""Publish adapters to the Hugging Face Hub and fetch them back, verified.

:func:`push` refuses an adapter that fails validation, then uploads its config, weights and model
card (see :mod:`loratools.card`) in one commit.  :func:`pull` downloads only the adapter files into
the huggingface_hub cache, copies them into a temporary sibling of the output, verifies them (spec
checks and the ``loratools.sha256`` checksum) and only then renames the directory into place, so a
failed or tampered download never leaves a partial adapter behind.  ``hf://owner/name[@rev]`` paths
go through :func:`fetch` too (see :func:`loratools.reader.read_raw`).

Tokens come from ``token=``, ``HF_TOKEN`` or the huggingface_hub login and are only ever handed to
huggingface_hub; every Hub failure becomes one :class:`~loratools.errors.HubError` line built here,
never the client's raw message (which can quote request details).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import spec
from .adapter import load, save
from .atomic import TEMP_PREFIX, atomic_output, check_output
from .card import build_card
from .errors import HubError, InvalidAdapterError
from .summary import summarize
from .validate import raise_errors, validate

SCHEME = "hf://"
ADAPTER_FILES = (spec.CONFIG_NAME, spec.WEIGHTS_NAME)
DEFAULT_MESSAGE = "Upload LoRA adapter with loratools"
_LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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


@dataclass(frozen=True)
class PullResult:
    """A verified local copy: ``path`` holds the adapter files of ``repo_id`` at commit ``commit_sha``."""

    repo_id: str
    revision: str
    commit_sha: str
    path: Path
    files: tuple[str, ...]
    offline: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def parse_ref(text: str) -> tuple[str, str | None]:
    """Split ``[hf://]owner/name[@revision]`` into repo id and revision (``None``: the default branch)."""
    body = text.removeprefix(SCHEME)
    repo_id, at, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise HubError(f"{text!r} is not a Hub adapter reference; write owner/name or owner/name@revision", repo_id=repo_id)
    return repo_id, revision or None


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
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as scratch, _hub_errors(repo_id, branch, token):
        folder = Path(adapter_path)
        if not all((folder / name).is_file() for name in ADAPTER_FILES):  # a bare file, kohya, diffusers: as a PEFT dir
            folder = save(adapter, Path(scratch) / "adapter")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        existing = _local_card(folder) or _remote_card(api, repo_id, branch, scratch)
        card = build_card(summarize(adapter), repo_id=repo_id, existing=existing, checksum=adapter.metadata.get(spec.META_SHA256))
        operations = [CommitOperationAdd(name, str(folder / name)) for name in ADAPTER_FILES]
        operations.append(CommitOperationAdd(spec.CARD_NAME, card.encode("utf-8")))
        info = api.create_commit(repo_id, operations, commit_message=message or DEFAULT_MESSAGE, revision=branch, create_pr=create_pr)
    files = (*ADAPTER_FILES, spec.CARD_NAME)
    return PushResult(repo_id, str(url), info.oid, info.commit_url, info.pr_revision or branch, files, info.pr_url)


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    out: str | Path | None = None,
    offline: bool = False,
    force: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Download, verify and place the adapter ``repo_id[@revision]`` in ``out``.

    ``out`` defaults to a directory named after the repo (``owner/name`` -> ``./name``) in the current
    directory; an existing one needs ``force``.  ``offline`` (or ``HF_HUB_OFFLINE=1``) reads the
    huggingface_hub cache only.  A download that fails verification is also evicted from that cache,
    so the next pull fetches it again instead of reusing the bad copy.
    """
    repo_id, ref_revision = parse_ref(repo_id)
    revision = revision or ref_revision
    target = check_output(Path(out) if out is not None else Path.cwd() / repo_id.split("/")[1], force=force)
    offline = offline or _offline_env()
    snapshot, sha = fetch(repo_id, revision, offline=offline, token=token, endpoint=endpoint)
    label = f"{SCHEME}{repo_id}@{sha}"
    with atomic_output(target, force=force) as tmp:
        for name in ADAPTER_FILES:
            shutil.copyfile(snapshot / name, tmp / name)
        problems = [replace(p, where=p.where.replace(str(tmp), label)) for p in validate(tmp).problems]
        if any(p.severity == "error" for p in problems):
            _evict(snapshot)
            raise_errors(problems, path=label)
    return PullResult(repo_id, revision or "main", sha, target, ADAPTER_FILES, offline)


def fetch(
    repo_id: str, revision: str | None, *, offline: bool = False, token: str | None = None, endpoint: str | None = None
) -> tuple[Path, str]:
    """The adapter files of ``repo_id`` at ``revision`` in the huggingface_hub cache: (snapshot dir, commit sha).

    Online, the file listing is checked first: a name that is absolute or climbs out of the repo
    (``../``) is refused before anything is downloaded, and a repo without both adapter files is not
    an adapter.  Only those two files are downloaded.
    """
    with _hub_errors(repo_id, revision or "main", token):
        if offline:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES), local_files_only=True, token=token)
        else:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
            names = [s.rfilename for s in info.siblings or []]
            _refuse_unsafe(names, repo_id)
            missing = [n for n in ADAPTER_FILES if n not in names]
            if missing:
                raise HubError(
                    f"{repo_id}@{revision or 'main'} has no {' or '.join(missing)}; it is not a PEFT adapter repo", repo_id=repo_id
                )
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES), token=token, endpoint=endpoint)
    snapshot = Path(folder)
    absent = [n for n in ADAPTER_FILES if not (snapshot / n).is_file()]
    if absent:
        raise HubError(f"{repo_id}@{revision or 'main'}: the cached copy lacks {', '.join(absent)}; pull it again online", repo_id=repo_id)
    return snapshot, snapshot.name


def fetch_uri(uri: str) -> Path:
    """Local snapshot directory for ``hf://owner/name[@rev]``, using the environment's token and endpoint."""
    repo_id, revision = parse_ref(uri)
    return fetch(repo_id, revision, offline=_offline_env())[0]


def is_unsafe(name: str) -> bool:
    """Whether a listed file name could land outside the repo directory (absolute, ``..``, drive, NUL)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or "\0" in name or any(p in ("", ".", "..") for p in parts)


def _refuse_unsafe(names: list[str], repo_id: str) -> None:
    unsafe = [n for n in names if is_unsafe(n)]
    if unsafe:
        raise HubError(
            f"{repo_id}: the server lists unsafe file name(s) {', '.join(map(repr, unsafe))} (absolute or leaving the repo); "
            "refusing to download anything from it",
            repo_id=repo_id,
        )


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _evict(snapshot: Path) -> None:
    """Drop the cached adapter files of a snapshot that failed verification (links and their blobs)."""
    for name in ADAPTER_FILES:
        link = snapshot / name
        blob = link.resolve()
        for p in (link, blob):
            if p.is_file() or p.is_symlink():
                p.unlink()


def _local_card(folder: Path) -> str | None:
    card = folder / spec.CARD_NAME
    return card.read_text(encoding="utf-8") if card.is_file() else None


def _remote_card(api: HfApi, repo_id: str, revision: str, scratch: str) -> str | None:
    try:
        path = hf_hub_download(repo_id, spec.CARD_NAME, revision=revision, endpoint=api.endpoint, token=api.token, cache_dir=scratch)
    except EntryNotFoundError:
        return None
    return Path(path).read_text(encoding="utf-8")


def _token_source(token: str | None) -> str | None:
    if token:
        return "the token given with --token"
    if os.environ.get("HF_TOKEN"):
        return "the token in HF_TOKEN"
    if get_token():
        return "the token saved by `hf auth login`"
    return None


def _auth_message(repo_id: str, status: int, token: str | None) -> str:
    source = _token_source(token)
    if source is None:
        return f"{repo_id}: the Hub requires authentication (HTTP {status}) and no token was found; {_LOGIN_HINT}"
    if status == 403:
        return f"{repo_id}: {source} is not allowed to do this (HTTP 403); use a token with write access to the repo, or {_LOGIN_HINT}"
    return f"{repo_id}: {source} was rejected (HTTP {status}); use a valid token: {_LOGIN_HINT}"


@contextmanager
def _hub_errors(repo_id: str, revision: str, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub and network failures into one :class:`HubError` line each."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below; anything unrecognised is re-raised
        message = _describe(err, repo_id, revision, token)
        if message is None:
            raise
        raise HubError(message, repo_id=repo_id) from err


def _describe(err: BaseException, repo_id: str, revision: str, token: str | None) -> str | None:
    response = err.response if isinstance(err, HfHubHTTPError) else None
    status = response.status_code if response is not None else None
    if isinstance(err, LocalEntryNotFoundError):  # a cache miss; its cause, if any, says why the Hub was not asked
        if err.__cause__ is not None and not isinstance(err.__cause__, OfflineModeIsEnabled):
            return _describe(err.__cause__, repo_id, revision, token)
        return f"{repo_id}@{revision} is not in the local cache and offline mode is on (--offline / HF_HUB_OFFLINE); pull it once online"
    if isinstance(err, GatedRepoError):
        return f"{repo_id} is a gated repo: request access on its Hub page, then use a token of the account that has it ({_LOGIN_HINT})"
    if status in (401, 403):
        return _auth_message(repo_id, status, token)
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (no such branch, tag or commit)"
    if isinstance(err, RepositoryNotFoundError):
        return f"repository {repo_id} not found on the Hub (check the name; if it is private, {_LOGIN_HINT})"
    if isinstance(err, EntryNotFoundError):
        return f"{repo_id}@{revision} is missing a file its listing announced; the repo changed during the pull, try again"
    if isinstance(err, (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException)):
        return f"{repo_id}: cannot reach the Hub ({type(err).__name__}); check the network, or use --offline to read the cache"
    if isinstance(err, httpx2.TransportError) or (isinstance(err, OSError) and "Consistency check failed" in str(err)):
        return f"{repo_id}@{revision}: the download was interrupted; nothing was written, run the command again"
    if isinstance(err, ValueError) and str(err).startswith("Invalid metadata in README.md"):
        reasons = "; ".join(line.lstrip("- ") for line in str(err).splitlines()[1:] if line.strip())
        return f"{repo_id}: the Hub rejected the model card's front matter ({reasons or 'no reason given'}); fix README.md"
    if response is not None:
        return f"{repo_id}: the Hub answered HTTP {status} {response.reason_phrase}; try again later"
    return None
