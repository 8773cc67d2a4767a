"""Bounded, verified GETs from the Hub: the only code that reads file bytes from a server.

A Hub is treated as hostile.  Every GET here has a bound on each thing a server can stretch out:
:data:`MAX_ATTEMPTS` tries in all (a broken or short body resumes with ``Range``), at most
:data:`MAX_REDIRECTS` redirects and no URL twice, and no more than the stall limit
(``HF_HUB_DOWNLOAD_TIMEOUT``, default 10 s) without a byte.  Pushes get bounds too
(:func:`bounded_session`).  Nothing the server says names a file on
disk: the caller picks the destination, and the bytes must match the size and hash the Hub listed
before they are renamed into place.  The ``Authorization`` header goes only to the endpoint's origin,
never to a CDN it redirects to (as huggingface_hub 2.4.0 ``utils/_http.py`` does for HEAD requests).  The Hub client (huggingface_hub,
httpx2) is imported on first use, as everywhere, so reading local files never pays for it.

A server's validators are checked too: an ``ETag`` / ``X-Linked-Etag`` from the Hub must be a bare
git sha1 or sha256 and agree with the listing, and ``X-Repo-Commit`` must be the commit asked for.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from ..errors import HubError

if TYPE_CHECKING:
    import httpx2

MAX_ATTEMPTS = 3  # requests per file, the first included
MAX_REDIRECTS = 5  # the Hub needs one (resolve -> CDN); more is a loop or a trap
CHUNK = 1 << 20
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?\Z')
_ERROR_BODY_LIMIT = 64 << 10
ANSWER_FACTOR = 6  # a write call (create_commit, ...) may wait this many stall limits for the Hub's answer: 60 s by default


@dataclass(frozen=True)
class Expected:
    """What the Hub's listing promised for one file: its size and the hash that names it.

    ``algorithm`` is ``"sha256"`` for LFS files (the ``lfs.sha256`` of the listing) or ``"git"`` for
    regular files (the git blob sha1, the listing's ``blobId``).  An ETag must name one of
    :attr:`etags`.
    """

    size: int
    algorithm: str
    digest: str
    commit: str
    blob_id: str | None = None  # an LFS file's git id (of its pointer): an ETag the Hub may also send for it

    @property
    def etags(self) -> tuple[str, ...]:
        return (self.digest,) if self.blob_id is None else (self.digest, self.blob_id)


def stall_seconds() -> float:
    """The longest a request may wait for the next byte (``HF_HUB_DOWNLOAD_TIMEOUT``)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def connect_seconds() -> float:
    """The longest a connection to the Hub may take to open (``HF_HUB_ETAG_TIMEOUT``, default 10 s)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT)


@contextmanager
def bounded_session() -> Iterator[None]:
    """Bound every request huggingface_hub's shared client sends while the body runs.

    ``HfApi.create_repo``, ``create_branch`` and ``create_commit`` pass no timeout, and the client
    huggingface_hub 2.4.0 builds (``utils/_http.py`` ``default_client_factory``) has ``timeout=None``:
    a Hub that accepts the connection and never answers would hang a push forever.  Here the shared
    client gets ``connect`` = :func:`connect_seconds` and ``read``/``write``/``pool`` =
    :data:`ANSWER_FACTOR` x :func:`stall_seconds` (the Hub may think a while before answering a
    commit), restored afterwards; a client the user configured with a timeout of its own is left as
    it is.  The timeout is a client attribute, so other threads' requests meanwhile get it too.
    """
    import httpx2
    from huggingface_hub.utils import get_session

    client = get_session()
    before = client.timeout
    unbounded = all(t is None for t in (before.connect, before.read, before.write, before.pool))
    if unbounded:
        client.timeout = httpx2.Timeout(ANSWER_FACTOR * stall_seconds(), connect=connect_seconds())
    try:
        yield
    finally:
        if unbounded:
            client.timeout = before


def hasher(expected: Expected) -> hashlib._Hash:
    """A hash object that, fed the file's bytes, ends in ``expected.digest`` if they are the listed ones."""
    if expected.algorithm == "git":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % expected.size)
        return h
    return hashlib.sha256()


def download(url: str, dest: Path, expected: Expected, *, token: str | None, label: str) -> None:
    """Write the file at ``url`` to the new file ``dest``, or raise :class:`HubError` and leave ``dest`` partial.

    The caller owns ``dest`` (a temporary name) and removes it on failure.  A body that breaks or ends
    short is resumed with ``Range`` within :data:`MAX_ATTEMPTS`; the whole file must then have
    ``expected.size`` bytes and hash to ``expected.digest``.
    """
    import httpx2

    digest = hasher(expected)
    written = 0
    failure = ""
    with open(dest, "xb") as out:
        for _ in range(MAX_ATTEMPTS):
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={written}-"} if written else {})}  # hash the bytes as stored
            try:
                with _open(url, token=token, headers=headers, label=label, expected=expected) as response:
                    if response.status_code in _RETRY_STATUS:
                        failure = f"HTTP {response.status_code}"
                        continue
                    if written and response.status_code != 206:  # the server ignored Range: start over
                        out.seek(0)
                        out.truncate()
                        digest, written = hasher(expected), 0
                    for chunk in response.iter_raw(CHUNK):
                        written += len(chunk)
                        if written > expected.size:
                            raise HubError(f"{label}: the Hub sent more than the {expected.size} bytes it listed; refused")
                        out.write(chunk)
                        digest.update(chunk)
            except httpx2.TimeoutException:
                failure = f"no data for {stall_seconds():g} s"
                continue
            except httpx2.TransportError as err:
                failure = f"connection broken ({type(err).__name__})"
                continue
            if written == expected.size:
                break
            failure = f"{written} of {expected.size} bytes"
        else:
            raise HubError(
                f"{label}: the download was interrupted ({failure}, {MAX_ATTEMPTS} attempts); nothing was written, run the command again"
            )
    if digest.hexdigest() != expected.digest:
        name = "LFS sha256" if expected.algorithm == "sha256" else "git blob id"
        raise HubError(
            f"{label}: the downloaded bytes do not match the {name} {expected.digest} the Hub listed; refused, nothing was written"
        )


def get_small(url: str, *, token: str | None, limit: int, label: str) -> bytes:
    """The body of ``url`` (at most ``limit`` bytes; more is refused), with the same bounds as :func:`download`."""
    import httpx2

    failure = ""
    for _ in range(MAX_ATTEMPTS):
        try:
            with _open(url, token=token, headers={}, label=label, expected=None) as response:
                if response.status_code in _RETRY_STATUS:
                    failure = f"HTTP {response.status_code}"
                    continue
                body = bytearray()
                for chunk in response.iter_bytes(CHUNK):
                    body += chunk
                    if len(body) > limit:
                        raise HubError(f"{label}: the Hub sent more than {limit} bytes; refused")
                return bytes(body)
        except httpx2.TimeoutException:
            failure = f"no data for {stall_seconds():g} s"
        except httpx2.TransportError as err:
            failure = f"connection broken ({type(err).__name__})"
    raise HubError(f"{label}: the Hub did not answer ({failure}, {MAX_ATTEMPTS} attempts); try again later")


class _open:
    """``with _open(...) as response``: a streamed GET after at most :data:`MAX_REDIRECTS` redirects, headers checked.

    A final status of 429 or 5xx is returned for the caller to retry; any other error status is raised
    as huggingface_hub's refined error (mapped to one line by ``remote.hub_errors``).
    """

    def __init__(self, url: str, *, token: str | None, headers: dict[str, str], label: str, expected: Expected | None) -> None:
        self.url, self.token, self.headers, self.label, self.expected = url, token, headers, label, expected
        self.response: httpx2.Response | None = None

    def __enter__(self) -> httpx2.Response:
        import httpx2
        from huggingface_hub.utils import build_hf_headers, get_session

        origin = _origin(self.url)
        url, seen = self.url, {self.url}
        timeout = httpx2.Timeout(stall_seconds())
        client = get_session()
        for _ in range(MAX_REDIRECTS + 1):
            on_hub = _origin(url) == origin
            headers = {**(build_hf_headers(token=self.token) if on_hub else {}), **self.headers}
            request = client.build_request("GET", url, headers=headers, timeout=timeout)
            response = client.send(request, stream=True, follow_redirects=False)
            if on_hub:
                self._check_validators(response)
            if not response.has_redirect_location:
                self.response = response
                if response.status_code >= 400 and response.status_code not in _RETRY_STATUS:
                    _raise_for_status(response, self.label)
                return response
            response.close()
            url = urljoin(url, response.headers["Location"])
            if url in seen:
                raise HubError(f"{self.label}: the Hub redirects in a loop (back to {url}); refused")
            seen.add(url)
        raise HubError(f"{self.label}: the Hub redirected more than {MAX_REDIRECTS} times; refused")

    def __exit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.close()

    def _check_validators(self, response: httpx2.Response) -> None:
        """Refuse an ETag that is not a bare hash or contradicts the listing, and a commit other than the one asked for."""
        etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag")
        if etag is not None:
            match = _ETAG.fullmatch(etag)
            if match is None:
                response.close()
                raise HubError(f"{self.label}: the Hub sent a malformed ETag {etag!r} (not a git sha1 or sha256); refused")
            if self.expected is not None and match.group(1) not in self.expected.etags:
                response.close()
                raise HubError(f"{self.label}: the Hub's ETag {etag!r} contradicts its listing ({self.expected.digest}); refused")
        commit = response.headers.get("X-Repo-Commit")
        if self.expected is not None and commit is not None and commit != self.expected.commit:
            response.close()
            raise HubError(f"{self.label}: the Hub answered for commit {commit!r}, not {self.expected.commit}; refused")


def _raise_for_status(response: httpx2.Response, label: str) -> None:
    """huggingface_hub's refined error for an error answer, reading its body only when it is declared small."""
    declared = response.headers.get("Content-Length")
    if declared is None or not declared.isdigit() or int(declared) > _ERROR_BODY_LIMIT:
        response.close()
        raise HubError(f"{label}: the Hub answered HTTP {response.status_code} {response.reason_phrase}; try again later")
    from huggingface_hub.utils import hf_raise_for_status

    response.read()
    response.close()
    hf_raise_for_status(response)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port
