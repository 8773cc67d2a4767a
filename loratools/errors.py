"""One small exception hierarchy for the whole library.

Every error loratools raises on bad input derives from :class:`LoratoolsError` and also from the
builtin it refines (``ValueError``, ``OSError``, ...), so callers can catch either.  Each carries the
file, tensor or field it is about, and its message says what would fix it; the CLI prints ``str(err)``
as a single line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding about an adapter: a stable ``code`` (see the spec), where it is (file, field or
    tensor), what is wrong, and whether it stops a load (``error``) or is only worth knowing."""

    code: str
    where: str
    message: str
    severity: Severity = "error"


class LoratoolsError(Exception):
    """Root of every error loratools raises on purpose."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None, code: str | None = None):
        self.path = str(path) if path is not None else None
        self.key = key
        self.code = code  # the validation problem code this error reports, where it has one
        super().__init__(message)

    def __str__(self) -> str:
        where = [w for w in (self.path, self.key) if w]
        message = super().__str__()
        return f"{': '.join(where)}: {message}" if where else message


class SpecError(LoratoolsError, ValueError):
    """An adapter breaks the on-disk spec (config field, tensor name, shape, dtype, version)."""


class FormatError(LoratoolsError, ValueError):
    """A file is not in a format we read: corrupt safetensors, a pickle, a foreign LoRA layout."""


class ChecksumError(FormatError):
    """Tensor data does not hash to the ``loratools.sha256`` recorded when it was written."""


class InvalidAdapterError(SpecError):
    """Validation found errors; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem], *, path: str | Path | None = None):
        self.problems = problems
        first, rest = problems[0], problems[1:]
        named = ", ".join(p.where for p in rest[:5]) + (", ..." if len(rest) > 5 else "")
        more = f" (and {len(rest)} more problem(s), at {named}; run `loratools validate` for all)" if rest else ""
        super().__init__(f"{first.where}: {first.message}{more}" if first.where else f"{first.message}{more}", path=path)


class ShapeError(LoratoolsError, ValueError):
    """Tensors that must agree in shape do not (A/B ranks, adapter vs base, adapters being combined)."""


class OutputExistsError(LoratoolsError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class HubError(LoratoolsError, OSError):
    """A Hub request failed: authentication, missing repo or revision, network, unsafe listing."""

    def __init__(self, message: str, *, repo_id: str | None = None, **kwargs):
        self.repo_id = repo_id
        super().__init__(message, **kwargs)


class ArgumentError(LoratoolsError, ValueError):
    """An argument is out of range or of the wrong kind (rank <= 0, weights that do not match inputs)."""


class MergeError(LoratoolsError, ValueError):
    """A merge or unmerge cannot be done faithfully as asked (DoRA conflicts, output inside the base, no CUDA)."""


class DiskSpaceError(LoratoolsError, OSError):
    """The output's file system has too little free space for the output; nothing was written."""


class DependencyError(LoratoolsError, ImportError):
    """An optional dependency a feature needs is not installed (matplotlib for ``--plot``)."""
