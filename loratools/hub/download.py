"""Fetch an adapter from the Hub into a directory of its own, verified before it appears.

:func:`pull` downloads only the adapter files into the huggingface_hub cache
(:func:`loratools.io.remote.fetch`, which checks every byte against the size and hash the Hub lists:
the LFS sha256 of the weights), copies them into a temporary sibling of the output, verifies them
again (spec checks and the ``loratools.sha256`` checksum where the file has one) and only then renames
the directory into place, so a failed or tampered download never leaves a partial adapter behind.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_output, check_output
from ..io.remote import ADAPTER_FILES, SCHEME, evict, fetch, offline_env, parse_ref
from ..validation import raise_errors, validate


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
    offline = offline or offline_env()
    snapshot, sha = fetch(repo_id, revision, offline=offline, token=token, endpoint=endpoint)
    label = f"{SCHEME}{repo_id}@{sha}"
    with atomic_output(target, force=force) as tmp:
        for name in ADAPTER_FILES:
            shutil.copyfile(snapshot / name, tmp / name)
        problems = [replace(p, where=p.where.replace(str(tmp), label)) for p in validate(tmp).problems]
        if any(p.severity == "error" for p in problems):
            evict(snapshot)
            raise_errors(problems, path=label)
    return PullResult(repo_id, revision or "main", sha, target, ADAPTER_FILES, offline)
