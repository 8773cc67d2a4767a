"""A small Hub-compatible HTTP server on loopback, so tests drive the real huggingface_hub client.

It speaks the subset of the Hub API that ``create_repo``, ``create_branch``, ``create_commit``,
``repo_info``, ``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download`` use: repo creation,
revision info, tree listing, preupload (every file ``regular``, never Xet), NDJSON commits with
base64 content, YAML validation and ``resolve`` with ``Range``.  State lives in memory:
repos -> refs (branch name -> commit sha) -> commits -> files.

Fault switches let a test play a hostile or broken server: a required token, a gated repo, a
file corrupted after its commit, a download cut off part-way, unsafe names in listings, and the
attacks of issue 12: ETags and commit shas that are paths, redirect loops, malformed listings,
terminal escapes in the reason phrase, a stalled body, a request never answered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_loopbackSECRETtoken0123456789"  # the secret tests configure; it must never show up in output


def is_lfs(path: str) -> bool:
    """Files the Hub stores with LFS (the repos' ``.gitattributes`` rule): their listing states a sha256."""
    return path.endswith(".safetensors")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ``oid`` and ``ETag`` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class HubState:
    """Everything the server knows, plus the fault switches tests flip."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.token: str | None = None  # when set, every request must carry ``Authorization: Bearer <token>``
        self.served: dict[tuple[str, str], bytes] = {}  # (repo_id, path) -> bytes served instead (server-side rot)
        self.truncate: dict[str, int] = {}  # path -> number of GETs still to end cleanly half-way (no Content-Length)
        self.drop: dict[str, int] = {}  # path -> number of GETs still to drop half-way through a declared length
        self.ranges: list[str] = []  # every Range header seen on a download
        self.unsafe_names: list[str] = []  # extra names every listing reports
        self.read_only_token: str | None = None  # accepted for reads, answered 403 on writes
        self.yaml_errors: list[str] = []  # validate-yaml answers 400 with these
        self.requests: list[str] = []  # "METHOD path" of every request, for assertions
        self.auth_headers: list[str] = []  # every Authorization header seen
        # hostile modes (issue 12)
        self.etags: dict[str, str] = {}  # path -> ETag sent instead of the file's hash (e.g. '"../../victim"')
        self.commit_sha: str | None = None  # the commit sha revision info reports instead of the real one
        self.repo_commit: str | None = None  # the X-Repo-Commit downloads report instead of the real one
        self.redirect_loop: set[str] = set()  # "api" / "resolve": answer 302 back to the same URL
        self.info_raw: bytes | None = None  # revision info answers this body instead (a malformed listing)
        self.fail: tuple[int, str] | None = None  # every request answered with this status and reason phrase
        self.stall: set[str] = set()  # paths whose GET sends headers, then no byte until ``release`` is set
        self.silent: set[str] = set()  # "METHOD /path" requests accepted and never answered (until ``release``, at most 5 s)
        self.release = threading.Event()

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str) -> Commit:
        repo = self.repos[repo_id]
        parent = repo.resolve(branch)
        merged = dict(parent.files) if parent else {}
        merged.update(files)
        digest = hashlib.sha1(f"{parent.sha if parent else ''}\n{message}\n".encode())
        for name in sorted(merged):
            digest.update(f"{name}\0{git_blob_sha(merged[name])}\n".encode())
        commit = Commit(digest.hexdigest(), message, merged)
        repo.commits[commit.sha] = commit
        repo.refs[branch] = commit.sha
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; do not wait on delayed ACKs
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # ---------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _reply(self, status: int, body: object = None, *, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, **headers: str) -> None:
        extra = {"X-Error-Message": message, **headers}
        if code:
            extra["X-Error-Code"] = code
        self._reply(status, {"error": message}, headers=extra)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        sent = self.headers.get("Authorization")
        if sent:
            self.state.auth_headers.append(sent)
        if sent and sent == f"Bearer {self.state.read_only_token}":
            if self.command == "POST":
                self._error(403, None, "You don't have the rights to write to this repo")
                return False
            return True
        if self.state.token is None or sent == f"Bearer {self.state.token}":
            return True
        if sent:
            self._error(401, None, "Invalid credentials in Authorization header")
        else:
            self._error(401, None, "Unauthorized")
        return False

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif repo.gated:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.")
            return None
        return repo

    def _commit(self, repo_id: str, revision: str) -> tuple[Repo, Commit] | None:
        repo = self._repo(repo_id)
        if repo is None:
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _etag(self, path: str, data: bytes) -> str:
        if path in self.state.etags:
            return self.state.etags[path]
        return f'"{sha256(data) if is_lfs(path) else git_blob_sha(data)}"'

    def _sibling(self, commit: Commit, name: str) -> dict:
        """A listing entry with the metadata ``files_metadata=True`` asks for (``blobs=True``): size, blobId, lfs."""
        data = commit.files.get(name, b"")
        entry: dict = {"rfilename": name, "size": len(data), "blobId": git_blob_sha(data)}
        if is_lfs(name):
            entry["lfs"] = {"size": len(data), "sha256": sha256(data), "pointerSize": 134}
        return entry

    def _listing(self, commit: Commit) -> list[str]:
        return sorted(commit.files) + self.state.unsafe_names

    # ---------------------------------------------------------------- routing
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.state.lock:
            self.state.requests.append(f"{self.command} {url.path}")
            if f"{self.command} {url.path}" in self.state.silent:
                return self._send_nothing()
            if self.state.fail is not None:
                return self._fail(*self.state.fail)
            kind = "api" if parts[:1] == ["api"] else "resolve"
            if kind in self.state.redirect_loop:
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not self._authorized():
                return
            body = self._body() if self.command == "POST" else b""
            if parts[:1] == ["api"]:
                self._api(parts[1:], query, body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            else:
                self._error(404, None, f"no route for {self.command} {url.path}")

    def _api(self, parts: list[str], query: dict[str, str], body: bytes) -> None:
        if parts == ["repos", "create"]:
            return self._create_repo(json.loads(body))
        if parts == ["validate-yaml"]:
            status = 400 if self.state.yaml_errors else 200
            return self._reply(status, {"errors": [{"message": m} for m in self.state.yaml_errors], "warnings": []})
        blobs = query.get("blobs") in ("1", "True", "true")
        if len(parts) == 3 and parts[0] == "models":
            return self._revision_info("/".join(parts[1:3]), "main", blobs=blobs)
        if len(parts) < 5 or parts[0] != "models":
            return self._error(404, None, "unknown API route")
        repo_id, action, rest = "/".join(parts[1:3]), parts[3], "/".join(parts[4:])
        if action == "revision":
            return self._revision_info(repo_id, rest, blobs=blobs)
        if action == "tree":
            return self._tree(repo_id, parts[4])
        if action == "preupload":
            return self._preupload(repo_id, json.loads(body))
        if action == "commit":
            return self._commit_files(repo_id, rest, body, create_pr=query.get("create_pr") == "1")
        if action == "branch":
            return self._create_branch(repo_id, rest, json.loads(body or b"{}"))
        return self._error(404, None, f"unknown action {action}")

    # ---------------------------------------------------------------- endpoints
    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._reply(409, {"error": "You already created this model repo", "url": url})
        self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self.state.commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        self._reply(200, {"url": url, "name": repo_id})

    def _fail(self, status: int, reason: str) -> None:
        self.send_response(status, reason)  # the reason phrase goes out raw, control characters and all
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _revision_info(self, repo_id: str, revision: str, *, blobs: bool = False) -> None:
        found = self._commit(repo_id, revision)
        if found and self.state.info_raw is not None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.state.info_raw)))
            self.end_headers()
            self.wfile.write(self.state.info_raw)
        elif found:
            repo, commit = found
            listing = self._listing(commit)
            siblings = [self._sibling(commit, name) if blobs else {"rfilename": name} for name in listing]
            sha = self.state.commit_sha or commit.sha
            self._reply(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings})

    def _tree(self, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found:
            files = found[1].files
            entries = [
                {"type": "file", "path": name, "size": len(files.get(name, b"")), "oid": git_blob_sha(files.get(name, b""))}
                for name in self._listing(found[1])
            ]
            self._reply(200, entries)

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id):
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
            self._reply(200, {"files": files})

    def _commit_files(self, repo_id: str, revision: str, body: bytes, *, create_pr: bool) -> None:
        found = self._commit(repo_id, revision)
        if not found:
            return
        repo = found[0]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        message = next(item["value"]["summary"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] != "file" or item["value"].get("encoding") != "base64":
                if item["key"] != "header":
                    return self._error(400, None, f"unsupported commit operation {item['key']}")
                continue
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        branch = revision
        pr_url = None
        if create_pr:
            repo.prs += 1
            branch = f"refs/pr/{repo.prs}"
            repo.refs[branch] = repo.refs.get(revision, revision)
            pr_url = f"{self.server.url}/{repo_id}/discussions/{repo.prs}"
        commit = self.state.commit(repo_id, branch, files, message)
        self._reply(
            200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.sha}", "commitOid": commit.sha, "pullRequestUrl": pr_url}
        )

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.refs:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha if start else ""
        self._reply(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        found = self._commit(repo_id, revision)
        if not found:
            return
        commit = found[1]
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist", **{"X-Repo-Commit": commit.sha})
        data = self.state.served.get((repo_id, path), commit.files[path])
        headers = {
            "X-Repo-Commit": self.state.repo_commit or commit.sha,
            "ETag": self._etag(path, commit.files[path]),
            "Accept-Ranges": "bytes",
        }
        start = _range_start(self.headers.get("Range"))
        if self.headers.get("Range"):
            self.state.ranges.append(self.headers["Range"])
        if self.command == "GET" and self.state.truncate.get(path, 0) > 0:
            self.state.truncate[path] -= 1
            return self._send_cut(data, headers, declare_length=False)
        if self.command == "GET" and path in self.state.stall:
            return self._send_stalled(data, headers)
        if self.command == "GET" and self.state.drop.get(path, 0) > 0:
            self.state.drop[path] -= 1
            return self._send_cut(data, headers, declare_length=True)
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:])

    def _send_stalled(self, data: bytes, headers: dict[str, str]) -> None:
        """Headers and a few bytes, then silence until the test releases it (never longer than 5 s).

        The lock is let go while waiting, so other requests (the client's retries) are answered.
        """
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:16])
        self.wfile.flush()
        self.state.lock.release()
        try:
            self.state.release.wait(5)
        finally:
            self.state.lock.acquire()
        self.close_connection = True

    def _send_nothing(self) -> None:
        """Read the request, then say nothing until the test releases it (never longer than 5 s), and hang up."""
        if self.command == "POST":
            self._body()
        self.state.lock.release()
        try:
            self.state.release.wait(5)
        finally:
            self.state.lock.acquire()
        self.close_connection = True

    def _send_cut(self, data: bytes, headers: dict[str, str], *, declare_length: bool) -> None:
        """Send half the file, then close.

        Without a Content-Length the client sees a short but clean end of body; with one, a broken
        connection, which it resumes with a ``Range`` request.
        """
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        if declare_length:
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-")[0] or 0)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the endpoint, ``hub.state`` the data."""

    def __init__(self) -> None:
        self.state = HubState()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
