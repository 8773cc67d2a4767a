"""Fetch an adapter from the Hub into a place of its own, verified before it appears.

:func:`pull` downloads only the adapter files into the huggingface_hub cache
(:func:`loratools.io.remote.fetch`, which checks every byte against the size and hash the Hub lists:
the LFS sha256 of the weights), copies them into a temporary sibling of the output, verifies them
again (spec checks and the ``loratools.sha256`` checksum where the file has one) and only then renames
it into place, so a failed or tampered download never leaves a partial adapter behind.  A PEFT repo
becomes a directory; one ``.safetensors`` file of a repo (``filename=``, e.g. a kohya or diffusers
LoRA) becomes that file, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ArgumentError, Problem
from ..io.atomic import atomic_output, check_output
from ..io.hubref import FILE_SUFFIX, HubRef, check_filename, parse
from ..io.remote import SCHEME, evict, fetch, offline_env
from ..validation import raise_errors, validate


@dataclass(frozen=True)
class PullResult:
    """A verified local copy: ``path`` holds the adapter of ``repo_id`` at commit ``commit_sha``.

    ``path`` is the adapter directory, or for a single-file pull the ``.safetensors`` file itself;
    ``files`` are the repo paths that were fetched.
    """

    repo_id: str
    revision: str
    commit_sha: str
    path: Path
    files: tuple[str, ...]
    offline: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    filename: str | None = None,
    out: str | Path | None = None,
    offline: bool = False,
    force: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Download, verify and place the adapter ``repo_id[@revision]`` (or its file ``filename``) in ``out``.

    ``repo_id`` may also be a file reference, ``owner/name[@rev]/path.safetensors``
    (:mod:`loratools.io.hubref`).  For a repo, ``out`` defaults to a directory named after it
    (``owner/name`` -> ``./name``); an existing one needs ``force``.  For a file, ``out`` is the
    directory to put it in (created if missing, default ``./name``) or, ending in ``.safetensors``,
    the file to write; an existing file needs ``force``, other files in the directory are left alone.
    ``offline`` (or ``HF_HUB_OFFLINE=1``) reads the huggingface_hub cache only.  A download that
    fails verification is also evicted from that cache, so the next pull fetches it again instead of
    reusing the bad copy.
    """
    ref = _reference(repo_id, revision, filename)
    offline = offline or offline_env()
    if ref.filename is not None:
        return _pull_file(ref, ref.filename, out, offline=offline, force=force, token=token, endpoint=endpoint)
    target = check_output(Path(out) if out is not None else Path.cwd() / ref.repo_id.split("/")[1], force=force)
    snapshot, sha, files = fetch(ref.repo_id, ref.revision, offline=offline, token=token, endpoint=endpoint)
    label = f"{SCHEME}{ref.repo_id}@{sha}"
    with atomic_output(target, force=force) as tmp:
        for name in files:
            shutil.copyfile(snapshot / name, tmp / name)
        _verify(validate(tmp).problems, str(tmp), label, lambda: evict(snapshot, files))
    return PullResult(ref.repo_id, ref.revision or "main", sha, target, files, offline)


def _pull_file(
    ref: HubRef, filename: str, out: str | Path | None, *, offline: bool, force: bool, token: str | None, endpoint: str | None
) -> PullResult:
    """The file ``filename`` of a repo, copied byte for byte; validated alone in a private directory before it is renamed into place."""
    name = PurePosixPath(filename).name
    folder = Path(out) if out is not None else Path.cwd() / ref.repo_id.split("/")[1]
    target = check_output(folder if folder.suffix == FILE_SUFFIX else folder / name, force=force)
    snapshot, sha, files = fetch(ref.repo_id, ref.revision, filename=filename, offline=offline, token=token, endpoint=endpoint)
    label = f"{SCHEME}{ref.repo_id}@{sha}/{filename}"
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # folders a failure must not leave behind
    try:
        with atomic_output(target, force=force, directory=False) as tmp, tempfile.TemporaryDirectory() as scratch:
            shutil.copyfile(snapshot / filename, tmp)
            alone = Path(scratch) / name  # no neighbour (a stray adapter_config.json beside the output) may change how it reads
            os.symlink(tmp.resolve(), alone)
            _verify(validate(alone).problems, str(alone), label, lambda: evict(snapshot, files))
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: somebody else's now
                folder.rmdir()
        raise
    return PullResult(ref.repo_id, ref.revision or "main", sha, target, (filename,), offline)


def _verify(problems: list[Problem], where: str, label: str, drop: Callable[[], None]) -> None:
    """Raise every error problem (named by the Hub ``label``, not the temporary ``where``), evicting the cached copy first."""
    problems = [replace(p, where=p.where.replace(where, label)) for p in problems]
    if any(p.severity == "error" for p in problems):
        drop()
        raise_errors(problems, path=label)


def _reference(text: str, revision: str | None, filename: str | None) -> HubRef:
    """The reference ``text`` with ``revision`` and ``filename`` folded in; a contradiction between them is refused."""
    ref = parse(text)
    if revision is not None and ref.revision is not None and revision != ref.revision:
        raise ArgumentError(f"{text!r} names the revision {ref.revision!r} but --revision says {revision!r}; give one")
    if filename is not None:
        filename = check_filename(filename)
        if ref.filename is not None and filename != ref.filename:
            raise ArgumentError(f"{text!r} names the file {ref.filename!r} but --file says {filename!r}; give one")
    return HubRef(ref.repo_id, revision or ref.revision, filename or ref.filename)
