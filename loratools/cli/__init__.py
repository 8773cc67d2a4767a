"""The ``loratools`` command line: parse options, call one library function, render the result.

No math or file-format logic lives here.  Errors map to one line on stderr and an exit code
(:mod:`.errors`):

  0  success                 1  the adapter is invalid (validate) or a check failed
  2  bad usage (options)     3  bad input or output (unreadable file, existing output, ...)
  4  Hub or network error    70 internal error (a bug: rerun with --debug and report it)
  130 interrupted (Ctrl-C, SIGTERM)

Signal handlers go in before anything heavy is imported: an interrupt while the process starts
exits 130 with one line, never a traceback.  Once a command runs, :mod:`.app` makes SIGINT and
SIGTERM unwind like Ctrl-C so partial outputs are removed.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


def _starting(signum: int, frame: Any) -> None:
    sys.stderr.write("error: interrupted; no output was written\n")
    sys.exit(130)


if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
    signal.signal(signal.SIGINT, _starting)
    signal.signal(signal.SIGTERM, _starting)

from .app import main  # noqa: E402
from .errors import EXIT_HUB, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_USAGE  # noqa: E402

__all__ = ["EXIT_HUB", "EXIT_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main"]
