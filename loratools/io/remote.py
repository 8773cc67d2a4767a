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
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from .. import spec
from ..errors import HubError
from . import hubget
from .atomic import TEMP_PREFIX
from .hubref import SCHEME, HubRef, check_filename, is_reference, is_unsafe, parse

__all__ = [
    "ADAPTER_FILES",
    "SCHEME",
    "HubRef",
    "evict",
    "fetch",
    "file_set",
    "hub_errors",
    "is_unsafe",
    "local_path",
    "parse_ref",
    "resolve",
]

ADAPTER_FILES = (spec.CONFIG_NAME, spec.WEIGHTS_NAME)
LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token"
_COMMIT = re.compile(r"[0-9a-f]{40}\Z")  # \Z, not $: "$" accepts a trailing newline
_SHOWN_NAMES = 10  # .safetensors names a "no such file" error lists


def parse_ref(text: str) -> tuple[str, str | None]:
    """Split ``[hf://]owner/name[@revision]`` (a repo, not a file in one) into repo id and revision (``None``: default branch)."""
    ref = parse(text)
    if ref.filename is not None:
        raise HubError(f"{text!r} names a file inside a repo; give the repo as owner/name[@revision]", repo_id=ref.repo_id)
    return ref.repo_id, ref.revision


def file_set(filename: str | None, listed: Callable[[str], bool] = lambda name: False) -> tuple[str, ...]:
    """The files a reference needs: the PEFT adapter files, or ``filename`` and, where listed, the config beside it.

    A file is read as it sits in its repo, so an ``adapter_config.json`` in the same folder (a PEFT
    or mlx-lm config) comes along; without it the read would depend on what else is cached.
    """
    if filename is None:
        return ADAPTER_FILES
    config = str(PurePosixPath(filename).with_name(spec.CONFIG_NAME))
    return (filename, config) if listed(config) else (filename,)


def fetch(
    repo_id: str,
    revision: str | None,
    *,
    filename: str | None = None,
    offline: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, str, tuple[str, ...]]:
    """The adapter files of ``repo_id`` at ``revision`` in the huggingface_hub cache: (snapshot dir, commit sha, files).

    ``filename`` (a ``.safetensors`` path in the repo, checked by :func:`loratools.io.hubref.check_filename`)
    asks for that one file instead of the PEFT adapter files (:func:`file_set`).  Online, the listing
    (``model_info`` with file metadata) is checked before anything touches the cache: the commit
    must be 40 hex digits, no name may be absolute or climb out of the repo, every wanted file must
    be listed with a size and a hash (LFS sha256, else git blob id).  Each file is then downloaded to
    a temporary name in the cache, checked against that size and hash, and only then named after the
    hash; loratools picks every name, the server none.  Offline, the cached snapshot must be named by
    a commit sha, its files must resolve inside the cache, and each blob must hash to its name.
    """
    from huggingface_hub import HfApi, constants

    if filename is not None:
        check_filename(filename)  # a library caller's name gets the checks a reference's does
    label = f"{repo_id}@{revision or 'main'}"
    if revision is not None and is_unsafe(revision.removeprefix("refs/")):
        raise HubError(f"{label}: the revision {revision!r} is not a branch, tag or commit name", repo_id=repo_id)
    storage = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    with hub_errors(repo_id, revision or "main", token):
        if offline:
            return _cached(storage, repo_id, revision, filename)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=hubget.stall_seconds())
            siblings = {s.rfilename: s for s in info.siblings or []}
            sha = info.sha
        except (KeyError, TypeError, AttributeError, ValueError) as err:  # ValueError: not JSON, not UTF-8
            raise HubError(
                f"{label}: the Hub sent a malformed file listing ({type(err).__name__}); refusing to download", repo_id=repo_id
            ) from err
        if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
            raise HubError(f"{label}: the Hub named the commit {sha!r}, not a 40-digit hex sha; refusing to download", repo_id=repo_id)
        names = list(siblings)
        if not all(isinstance(n, str) for n in names):
            raise HubError(
                f"{label}: the Hub sent a malformed file listing (a name that is not text); refusing to download", repo_id=repo_id
            )
        _refuse_unsafe(names, repo_id)
        files = file_set(filename, siblings.__contains__)
        missing = [n for n in files if n not in names]
        if missing and filename is None:
            raise HubError(f"{label} has no {' or '.join(missing)}; it is not a PEFT adapter repo", repo_id=repo_id)
        if missing:
            raise HubError(f"{label} has no file {filename!r}; {_held(names)}", repo_id=repo_id)
        expected = {name: _expected(siblings[name], sha, f"{label}: {name}") for name in files}
        snapshot = storage / "snapshots" / sha
        for name, want in expected.items():
            blob = storage / "blobs" / want.digest
            if not (blob.is_file() and not blob.is_symlink() and _matches(blob, want)):
                url = f"{api.endpoint}/{repo_id}/resolve/{sha}/{quote(name)}"  # as huggingface_hub 2.4.0 hf_hub_url quotes it
                _download_blob(url, blob, want, token=token, label=f"{label}: {name}")
            _link(snapshot / name, blob, inside=snapshot, label=f"{label}: {name}")
        if revision != sha:
            _write_ref(storage / "refs" / (revision or "main"), sha)
    return snapshot, sha, files


def _held(names: list[str]) -> str:
    """What a repo holds instead, for a "no such file" error: its ``.safetensors`` names (at most :data:`_SHOWN_NAMES`)."""
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if not found:
        return "it holds no .safetensors file"
    more = f" and {len(found) - _SHOWN_NAMES} more" if len(found) > _SHOWN_NAMES else ""
    return f"it holds {', '.join(map(repr, found[:_SHOWN_NAMES]))}{more}"


def evict(snapshot: Path, files: tuple[str, ...] = ADAPTER_FILES) -> None:
    """Drop the cached adapter files of ``snapshot`` (links and their blobs), never a path outside the cache.

    A link that resolves anywhere but this repo's ``blobs/`` inside the huggingface_hub cache (planted
    by a hostile server's ETag in an older client, or by hand) is unlinked itself; its target is left
    alone.  A snapshot outside the cache is not touched at all.
    """
    from huggingface_hub import constants

    root = Path(os.path.realpath(constants.HF_HUB_CACHE))
    blobs = Path(os.path.realpath(snapshot.parent.parent / "blobs"))  # storage/snapshots/<sha> -> storage/blobs
    for name in files:
        if is_unsafe(name):
            continue
        link = snapshot / name
        if not Path(os.path.realpath(link.parent)).is_relative_to(root):
            continue
        blob = Path(os.path.realpath(link))
        if blob.is_relative_to(root) and blob.parent == blobs and blob.is_file():
            blob.unlink()
        if link.is_symlink() or link.is_file():
            link.unlink()


def _expected(sibling: object, sha: str, label: str) -> hubget.Expected:
    """The size and hash the listing states for one file, or a refusal if it states none (or nonsense)."""
    size = getattr(sibling, "size", None)
    lfs = getattr(sibling, "lfs", None)
    blob_id = getattr(sibling, "blob_id", None)
    if lfs is not None:
        size, algorithm, digest = lfs.size, "sha256", lfs.sha256
    else:
        algorithm, digest = "git", blob_id
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
        raise HubError(f"{label}: the Hub's listing states no size and hash for this file; refusing to download it unverified")
    if not re.fullmatch(r"[0-9a-f]{64}" if algorithm == "sha256" else r"[0-9a-f]{40}", digest):
        raise HubError(f"{label}: the Hub's listing gives the hash {digest!r}, not a {algorithm} hex digest; refused")
    pointer = blob_id if algorithm == "sha256" and isinstance(blob_id, str) and re.fullmatch(r"[0-9a-f]{40}", blob_id) else None
    return hubget.Expected(size, algorithm, digest, sha, pointer)


def _matches(path: Path, expected: hubget.Expected) -> bool:
    """Whether the file at ``path`` has the expected size and hash."""
    if path.stat().st_size != expected.size:
        return False
    digest = hubget.hasher(expected)
    with open(path, "rb") as f:
        while chunk := f.read(hubget.CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == expected.digest


def _download_blob(url: str, blob: Path, expected: hubget.Expected, *, token: str | None, label: str) -> None:
    """Download into a temporary sibling of ``blob``, verify, rename into place; nothing is left on failure."""
    blob.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".incomplete", dir=blob.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()
        hubget.download(url, tmp, expected, token=token, label=label)
        os.replace(tmp, blob)
    finally:
        tmp.unlink(missing_ok=True)


def _link(link: Path, blob: Path, *, inside: Path, label: str) -> None:
    """Point ``link`` at ``blob`` with a relative symlink, as huggingface_hub's cache does, replacing any old one.

    A folder on the way that resolves outside the snapshot ``inside`` (the snapshot or a folder in it
    a symlink planted in the cache) is refused before anything is written through it.
    """
    inside.mkdir(parents=True, exist_ok=True)
    storage = Path(os.path.realpath(inside.parent.parent))  # storage/snapshots/<sha>: the repo's own folder, wherever the cache lives
    if not Path(os.path.realpath(link.parent)).is_relative_to(storage / "snapshots" / inside.name):  # before a folder is made through it
        raise HubError(f"{label}: the cached snapshot's folder {link.parent} leads outside the cache; refused, remove it and pull again")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f"{TEMP_PREFIX}{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(blob, link.parent))
    os.replace(tmp, link)


def _write_ref(ref: Path, sha: str) -> None:
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{TEMP_PREFIX}{ref.name}.{os.getpid()}")
    tmp.write_text(sha, encoding="ascii")
    os.replace(tmp, ref)


def _cached(storage: Path, repo_id: str, revision: str | None, filename: str | None) -> tuple[Path, str, tuple[str, ...]]:
    """The cached snapshot of ``revision``, checked: a commit-sha name, files inside the cache, blobs that hash to their names.

    Without the listing, a file's neighbouring config counts as listed when the snapshot has it (it
    is then checked like the file); a cache holds only what an earlier listing named.
    """
    label = f"{repo_id}@{revision or 'main'}"
    ref = storage / "refs" / (revision or "main")
    if revision is not None and _COMMIT.fullmatch(revision):
        sha = revision
    elif ref.is_file():
        sha = ref.read_text(encoding="ascii", errors="replace").strip()
    else:
        raise HubError(
            f"{label} is not in the local cache and offline mode is on (--offline / HF_HUB_OFFLINE); pull it once online", repo_id=repo_id
        )
    if not _COMMIT.fullmatch(sha):
        raise HubError(f"{label}: the cache names the commit {sha!r}, not a 40-digit hex sha; pull it again online", repo_id=repo_id)
    snapshot = storage / "snapshots" / sha
    root = Path(os.path.realpath(storage))
    files = file_set(filename, lambda name: os.path.lexists(snapshot / name))
    for name in files:
        path = snapshot / name
        if not path.exists():
            raise HubError(f"{label}: the cached copy lacks {name}; pull it again online", repo_id=repo_id)
        blob = Path(os.path.realpath(path))
        if not blob.is_relative_to(root / "blobs"):
            raise HubError(f"{label}: the cached {name} points outside the cache ({blob}); refused, pull it again online", repo_id=repo_id)
        digest = blob.name
        algorithm = "sha256" if len(digest) == 64 else "git"
        size = blob.stat().st_size
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", digest) or not _matches(blob, hubget.Expected(size, algorithm, digest, sha)):
            raise HubError(f"{label}: the cached {name} does not hash to its blob name; refused, pull it again online", repo_id=repo_id)
    return snapshot, sha, files


def local_path(path: str | Path) -> Path:
    """``path`` itself, or for an ``hf://`` reference the local copy of what it names (see :func:`resolve`)."""
    return resolve(path)[0]


def resolve(path: str | Path) -> tuple[Path, Callable[[], None] | None]:
    """``(path, None)``, or for an ``hf://`` reference (:mod:`loratools.io.hubref`) its verified local copy and an evictor.

    The copy is the snapshot directory of a PEFT repo's adapter files, or the one file a
    ``.../file.safetensors`` reference names.  The evictor drops exactly what was fetched from the
    cache: a caller that finds the bytes unreadable or invalid calls it, so the next use fetches them
    again (online) or refuses (offline) instead of trusting the copy.  The Hub is asked with the
    environment's token and endpoint (``HF_TOKEN``, ``HF_ENDPOINT``).
    """
    if not is_reference(path):
        return Path(path), None
    ref = parse(str(path))
    snapshot, _, files = fetch(ref.repo_id, ref.revision, filename=ref.filename, offline=offline_env())
    return (snapshot / ref.filename if ref.filename else snapshot), lambda: evict(snapshot, files)


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
    if isinstance(err, httpx2.TooManyRedirects):
        return f"{repo_id}: the Hub redirected too many times (a redirect loop); refused, try again later"
    if isinstance(err, (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.ConnectTimeout)):
        return f"{repo_id}: cannot reach the Hub ({type(err).__name__}); check the network, or use --offline to read the cache"
    if isinstance(err, httpx2.TimeoutException):  # connected, then no answer within the bounds of io.hubget
        return f"{repo_id}: the Hub did not answer in time ({type(err).__name__}); try again later"
    if isinstance(err, httpx2.TransportError) or (isinstance(err, OSError) and "Consistency check failed" in str(err)):
        return f"{repo_id}@{revision}: the download was interrupted; nothing was written, run the command again"
    if isinstance(err, ValueError) and str(err).startswith("Invalid metadata in README.md"):
        reasons = "; ".join(line.lstrip("- ") for line in str(err).splitlines()[1:] if line.strip())
        return f"{repo_id}: the Hub rejected the model card's front matter ({reasons or 'no reason given'}); fix README.md"
    if response is not None:
        return f"{repo_id}: the Hub answered HTTP {status} {response.reason_phrase}; try again later"
    if isinstance(err, httpx2.HTTPError):  # any other failure of the HTTP exchange (a malformed status line, ...)
        return f"{repo_id}: the Hub's answer could not be read ({type(err).__name__}); try again later"
    return None
