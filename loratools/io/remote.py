"""Adapter files fetched from the Hugging Face Hub into the huggingface_hub cache, and Hub errors.

This is the one place that talks to the Hub client for reading: :func:`fetch` checks the server's
file listing before anything is downloaded, fetches only the adapter files, and every failure of the
client or the network becomes one :class:`~loratools.errors.HubError` line built here
(:func:`hub_errors`), never the client's raw message (which can quote request details).

huggingface_hub is imported on first use, so reading local files never pays for it.  Tokens come
from ``token=``, ``HF_TOKEN`` or the huggingface_hub login and are only ever handed to the client.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import spec
from ..errors import HubError

SCHEME = "hf://"
ADAPTER_FILES = (spec.CONFIG_NAME, spec.WEIGHTS_NAME)
LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_ref(text: str) -> tuple[str, str | None]:
    """Split ``[hf://]owner/name[@revision]`` into repo id and revision (``None``: the default branch)."""
    body = text.removeprefix(SCHEME)
    repo_id, at, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise HubError(f"{text!r} is not a Hub adapter reference; write owner/name or owner/name@revision", repo_id=repo_id)
    return repo_id, revision or None


def fetch(
    repo_id: str, revision: str | None, *, offline: bool = False, token: str | None = None, endpoint: str | None = None
) -> tuple[Path, str]:
    """The adapter files of ``repo_id`` at ``revision`` in the huggingface_hub cache: (snapshot dir, commit sha).

    Online, the file listing is checked first: a name that is absolute or climbs out of the repo
    (``../``) is refused before anything is downloaded, and a repo without both adapter files is not
    an adapter.  Only those two files are downloaded.
    """
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors(repo_id, revision or "main", token):
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


def local_path(path: str | Path) -> Path:
    """``path`` itself, or for ``hf://owner/name[@rev]`` the snapshot directory of its adapter files.

    The Hub is asked with the environment's token and endpoint (``HF_TOKEN``, ``HF_ENDPOINT``).
    """
    if isinstance(path, str) and path.startswith(SCHEME):
        repo_id, revision = parse_ref(path)
        return fetch(repo_id, revision, offline=offline_env())[0]
    return Path(path)


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


def offline_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _token_source(token: str | None) -> str | None:
    from huggingface_hub import get_token

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
        return f"{repo_id}: the Hub requires authentication (HTTP {status}) and no token was found; {LOGIN_HINT}"
    if status == 403:
        return f"{repo_id}: {source} is not allowed to do this (HTTP 403); use a token with write access to the repo, or {LOGIN_HINT}"
    return f"{repo_id}: {source} was rejected (HTTP {status}); use a valid token: {LOGIN_HINT}"


@contextmanager
def hub_errors(repo_id: str, revision: str, token: str | None) -> Iterator[None]:
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
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    response = err.response if isinstance(err, HfHubHTTPError) else None
    status = response.status_code if response is not None else None
    if isinstance(err, LocalEntryNotFoundError):  # a cache miss; its cause, if any, says why the Hub was not asked
        if err.__cause__ is not None and not isinstance(err.__cause__, OfflineModeIsEnabled):
            return _describe(err.__cause__, repo_id, revision, token)
        return f"{repo_id}@{revision} is not in the local cache and offline mode is on (--offline / HF_HUB_OFFLINE); pull it once online"
    if isinstance(err, GatedRepoError):
        return f"{repo_id} is a gated repo: request access on its Hub page, then use a token of the account that has it ({LOGIN_HINT})"
    if status in (401, 403):
        return _auth_message(repo_id, status, token)
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} (no such branch, tag or commit)"
    if isinstance(err, RepositoryNotFoundError):
        return f"repository {repo_id} not found on the Hub (check the name; if it is private, {LOGIN_HINT})"
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
