"""The one table from exception type to exit code, and the one-line message for each failure.

As huggingface_hub's ``cli/_errors.py`` does: the first row whose type matches decides.  The codes
are documented in the README and in ``loratools --help``.
"""

from __future__ import annotations

from ..errors import ArgumentError, HubError, LoratoolsError

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INPUT, EXIT_HUB, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 70, 130

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (HubError, EXIT_HUB),  # before OSError, which HubError also is
    (ArgumentError, EXIT_USAGE),
    (LoratoolsError, EXIT_INPUT),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
    (OSError, EXIT_INPUT),
)


def describe(error: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``error``; anything not in :data:`EXIT_CODES` is a bug (70)."""
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return _message(error), code
    return f"internal error: {type(error).__name__}: {error} (rerun with --debug for a traceback and report it)", EXIT_INTERNAL


def _message(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; no output was written"
    if isinstance(error, OSError) and not isinstance(error, LoratoolsError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return str(error)
