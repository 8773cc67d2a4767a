"""What a Hub reference names: a PEFT adapter repo, or one ``.safetensors`` file in a repo.

The grammar (``hf://`` optional where a command takes a repo id)::

    hf://owner/name                          the PEFT adapter files of the default branch
    hf://owner/name@REV                      the same at REV (branch, tag, commit; may contain '/': refs/pr/1, feature/x)
    hf://owner/name/PATH.safetensors         one file of the default branch (PATH may hold folders)
    hf://owner/name@REV/PATH.safetensors     one file at REV

A reference names a file exactly when a third '/'-segment follows ``owner/name[@REV]`` and the last
segment ends in ``.safetensors``; any other third segment is refused, so no reference means two
things.  In the file form REV ends at the first '/' unless it is ``refs/pr/N`` or
``refs/convert/NAME`` (huggingface_hub 2.4.0 ``utils/_hf_uris.py`` ``_parse_repo_body`` splits the
same way); a '/' inside any other revision is written ``%2F`` (REV is percent-decoded, as there) or
given with ``--revision``.

File names are the user's, never the server's, so they are checked here before any request: no
absolute path, no ``..``/``.``/empty segment, no backslash or control character, a ``.safetensors``
suffix.  Whether the repo lists the name is checked against the listing (:mod:`loratools.io.remote`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import ArgumentError, HubError

SCHEME = "hf://"
FILE_SUFFIX = ".safetensors"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+\Z")
_SPECIAL_REF = re.compile(r"refs/(?:pr/\d+|convert/\w+)(?=/|\Z)")  # huggingface_hub 2.4.0 hf_api.SPECIAL_REFS_REVISION_REGEX
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class HubRef:
    """A parsed reference: ``filename`` is a path inside the repo, or ``None`` for the PEFT adapter files."""

    repo_id: str
    revision: str | None
    filename: str | None = None

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{at}" + (f"/{self.filename}" if self.filename else "")


def is_reference(path: object) -> bool:
    """Whether ``path`` is an ``hf://`` reference (a string; a ``Path`` is always local)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(text: str) -> HubRef:
    """Split ``[hf://]owner/name[@REV][/PATH.safetensors]`` by the rule in the module docstring."""
    body = text.removeprefix(SCHEME)
    head, at, rest = body.partition("@")
    if at and head.count("/") != 1:  # an '@' inside a file path ("me/a/x@1.safetensors") is literal
        head, at, rest = body, "", ""
    if at:
        if not rest:
            raise _not_a_reference(text, head)
        match = _SPECIAL_REF.match(rest)
        last = rest.rsplit("/", 1)[-1]
        if not last.endswith(FILE_SUFFIX) or "/" not in rest:
            return HubRef(_repo_id(head, text), unquote(rest), None)  # a PEFT repo; the whole rest is the revision
        revision, _, filename = (match.group(), "/", rest[match.end() + 1 :]) if match else rest.partition("/")
        return HubRef(_repo_id(head, text), unquote(revision), check_filename(filename))
    parts = head.split("/", 2)
    repo_id = _repo_id("/".join(parts[:2]), text)
    if len(parts) == 2:
        return HubRef(repo_id, None, None)
    if not parts[2].endswith(FILE_SUFFIX):
        raise HubError(
            f"{text!r} is not a Hub adapter reference: a path inside a repo must name a {FILE_SUFFIX} file "
            "(write owner/name[@revision] for a PEFT adapter repo)",
            repo_id=repo_id,
        )
    return HubRef(repo_id, None, check_filename(parts[2]))


def check_filename(name: str) -> str:
    """``name`` if it is a safe relative ``.safetensors`` path inside a repo; :class:`ArgumentError` otherwise."""
    why = None
    if not name:
        why = "it is empty"
    elif "\\" in name or _CONTROL.search(name):
        why = "backslashes and control characters are not allowed"
    elif is_unsafe(name):
        why = "it is absolute or leaves the repo ('..', '.', empty segments)"
    elif not name.endswith(FILE_SUFFIX) or name.rsplit("/", 1)[-1] == FILE_SUFFIX:
        why = f"only {FILE_SUFFIX} files are read (never pickles)"
    if why:
        raise ArgumentError(f"the file name {name!r} is refused: {why}; give a path as the repo lists it, e.g. lora.safetensors")
    return name


def is_unsafe(name: str) -> bool:
    """Whether a file name could land outside the repo directory (absolute, ``..``, drive, NUL)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or "\0" in name or any(p in ("", ".", "..") for p in parts)


def _repo_id(text: str, original: str) -> str:
    if not _REPO_ID.fullmatch(text):
        raise _not_a_reference(original, text)
    return text


def _not_a_reference(text: str, repo_id: str) -> HubError:
    return HubError(
        f"{text!r} is not a Hub adapter reference; write owner/name, owner/name@revision or owner/name[@revision]/file.safetensors",
        repo_id=repo_id,
    )
